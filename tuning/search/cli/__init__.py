"""The search's commands: `search`, `report`, `replicate` and `rungs`.

Each is imported only by its entry point (`python -m tuning.search`, `tuning.report`,
`tuning.replicate`, `tuning.rungs`); what they share lives in the modules they call.
"""
