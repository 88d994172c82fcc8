"""Structure-aware fuzzing of the decode path (tests/test_fuzz_decode.py runs a few
hundred cases in CI, bench/fuzz_decode.py ten thousand and more).

- `seeds`: valid files of every format and mode a raw dataset holds, made with Pillow;
- `layouts`: where each format keeps what a decoder trusts (chunk lengths, widths
  and heights, palette sizes), found by walking the format's own structure;
- `mutations`: changes aimed at those fields, truncations at structure boundaries,
  bit flips and splices; case *i* of a run is the same file on every machine;
- `run`: one case through the preprocess build's per-input step, and many in a
  child process that measures time and memory and survives a crash or a hang.
"""
