"""What every entry point shares: the flags spelt once (`args`) and the error shell (`shell`).

May import: `cfcml` and any `tuning` package (it sits above them all, beside the entry points)."""
