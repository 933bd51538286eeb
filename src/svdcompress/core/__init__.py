"""The core: configuration, rank choice, factorisation, calibration, compress_, layers,
module swaps and the run-directory format. It imports neither the study nor any
integration; they import it and register their layer kinds and architectures with it."""
