"""The hyper-parameter search (HPO): search files and the Tune space (`space`), one search resolved
from files and flags (`run`), the Tune driver (`driver`), what a search and a comparison share
(`tuner`), the functions Tune runs per trial (`trial`), the Ray Train worker loop (`trainer`) and the
prepared dataset a search trains on (`prepared`).

May import: `cfcml`, `tuning.records`, `tuning.runtime`, `tuning.tracking`."""
