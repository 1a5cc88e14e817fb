"""What the numbers say: CFCML against its defaults, ablations and baselines (`comparison`),
clinical evidence beyond AUC (`clinical`), the search report (`search_report`), the console summary
(`summary`), the figures (`plots`), nested cross-validation's estimate (`nested`) and what tuning
bought, the search's closing defaults-vs-chosen comparison (`bought`).

May import: `cfcml`, `tuning.records`, `tuning.runtime`, `tuning.tracking`, `tuning.hpo`."""
