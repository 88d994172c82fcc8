"""The quickstart's latent step: an autoencoder for a dataset that has none.

`autoencoder_for(cfg)` preprocesses the digits (as the night would: it then
appends nothing), trains a small AutoencoderKL on them with
`tasks.train_autoencoder`'s library call, and keeps its `save_pretrained` folder
at `cfg.autoencoder`, where the nightly's encode step reads it. An autoencoder
already kept there is used as it is, so a re-run trains none (and the latents,
whose dataset records the autoencoder's digest, stay valid).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config.quickstart import QuickstartConfig
from pipeline.edges import autoencoders, storage


def autoencoder_for(cfg: QuickstartConfig, say: Callable[[str], None] = print) -> str:
    """The autoencoder folder of `cfg` (trained now unless kept); its location."""
    from pipeline.jobs.preprocess import preprocess
    from pipeline.jobs.train.autoencoder import train_autoencoder

    try:
        files = autoencoders.read_folder(cfg.autoencoder)
    except autoencoders.AutoencoderError:
        files = None
    if files is not None:
        digest = autoencoders.identity_of(files).digest
        say(f"autoencoder: kept at {cfg.autoencoder} (digest {digest[:12]}...)")
        return cfg.autoencoder
    prepared = preprocess(cfg.nightly_config().preprocess_config(), append=True)
    say(f"autoencoder: preprocess: {prepared.summary()}")
    result = train_autoencoder(cfg.autoencoder_config())
    say(f"autoencoder: {result.summary()}")
    for name, data in autoencoders.read_folder(
        storage.join(result.checkpoint, "autoencoder")
    ).items():
        storage.write_bytes(storage.join(cfg.autoencoder, name), data)
    say(f"autoencoder: kept at {cfg.autoencoder}")
    return cfg.autoencoder
