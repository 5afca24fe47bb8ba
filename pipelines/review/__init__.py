"""The review side: the pipeline report over every stage's outputs."""
