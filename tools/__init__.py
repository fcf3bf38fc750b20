"""Command-line tools over the library and the training job (convert_checkpoint, bench, bench_dist,
comm_bytes, compare_runs, train_reference); each runs as a file, `python tools/NAME.py`."""
