"""Importance matrices (llama-imatrix's job): ``collect`` runs the model over calibration text and accumulates the
per-column sums of squares of every matmul input; ``files`` reads and writes both of llama.cpp's file formats;
``run`` is the whole job from files to file (``compute_imatrix_file``, what ``gguftool imatrix`` calls)."""
