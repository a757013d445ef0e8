"""What a caller does with a recipe: merge it to a file (`pipeline`), or, for the tab, the plots and the API, into
the loaded model with history and incremental re-merges (`merge_service`)."""
