"""Per-tensor type allocation for a target size (``--target-size`` / ``--target-bpw``).

- :mod:`.candidates`: which types each tensor may take (every type gguftool writes, within llama.cpp's rules);
- :mod:`.measure`: what a type costs each tensor: imatrix-weighted weight error per type, and (with calibration
  text) the measured KL-divergence of the model with that one tensor quantized; the cache file;
- :mod:`.solve`: the choice of one type per tensor that minimises the predicted KL-divergence within a byte budget;
- :mod:`.search`: the whole job (the stock mix as a candidate, the full-mix check, the metadata written).
"""
