"""Running convert, quantize and imatrix on a Ray cluster (the optional ``ray`` extra).

Ray is imported only here and only when ``--ray`` is given, so the default install neither needs nor loads it."""
