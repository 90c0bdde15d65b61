"""What a search reports: the paper's tables from unselected replicates (`tables`), their
statistics (`stats`), hyperparameter importances (`importance`) and figures (`figures`),
built from the search's MLflow records (`build`)."""
