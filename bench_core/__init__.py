"""bench_core: classic ensembles vs BatchEnsemble — models, data, training, evaluation, store, CLI."""

__version__ = "0.1.0"
