"""Multi-stage experiments built on the data, models, merging, train and evaluate rooms."""
