"""What one stage writes and the next reads, with one reader and one writer each: epoch reports
and the search outcome (`outcome`), trial checkpoints (`checkpoints`) and the state files a resumed
search reads (`state_files`).

May import: `cfcml` only (no Ray, no MLflow at import time)."""
