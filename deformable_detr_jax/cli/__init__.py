"""The command lines (`train`, `predict`, `demo`; `convert` and `export` live in their rooms)
and `exits`, the exit statuses and one-line error reports they all share."""
