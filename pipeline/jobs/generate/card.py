"""The dataset card of a generated dataset: what it holds, where it came from and
whether it can be trusted, as the manifest's `card`, as `card.md` beside it (with
`grid.png`, a row per class) and in MLflow.

It says how many images of each class the dataset holds and how many were drawn
to get them; the judge's label fidelity on them; how near each came to a
training image (the copy ratio's histogram, and the share flagged as copies);
the Classification Accuracy Score when the training dataset has a validation
split; the model and dataset versions; the sampler and guidance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config.records import GenerationJob, ModelCard
from pipeline.jobs.generate.gate import HISTOGRAM, Gate
from pipeline.jobs.generate.sampler import Tally

CARD = "card.md"
GRID = "grid.png"


def scores(
    output: str,
    samples: dict,
    gate: Gate,
    manifest: dict,
    judge_images: int,
    heldout_images: int,
    threads: int,
) -> dict[str, float]:
    """Label fidelity and CAS of the generated dataset (`samples`: its manifest)
    against the training dataset's validation split: a Ray task's work (the CAS
    classifier trains on as many generated images as the judge saw real ones)."""
    import torch

    from pipeline.data.reference import Split, label_scores, read_split

    torch.set_num_threads(threads)
    train = Split(gate.dataset, manifest, "train", judge_images)
    validation = Split(gate.dataset, manifest, "validation", heldout_images)
    images, labels = read_split(output, samples, "train", train.count())
    if images is None or labels is None:
        return {}
    found, _ = label_scores(train, validation, gate.digest, {"": images}, labels, {"": ""})
    return found


def card(
    job: GenerationJob,
    card_of_model: ModelCard,
    gate: Gate | None,
    tallies: list[dict[str, Any]],
    found: dict[str, float],
) -> dict[str, Any]:
    """The card's fields, from the shards' tallies and the label scores `found`."""
    tally = Tally()
    for t in tallies:
        tally = tally.add(Tally(t))
    kept = sum(tally.per_class.values())
    names = card_of_model.classes
    per_class = {
        (names[int(k)] if names and k.isdigit() else k): n for k, n in tally.per_class.items()
    }
    checked = None if gate is None else {"dataset": gate.dataset, "digest": gate.digest}
    memorisation = None
    if gate is not None and gate.index is not None:
        memorisation = {
            "max_copy_ratio": gate.max_copy_ratio,
            "flagged": tally.flagged,
            "rate": tally.flagged / kept if kept else 0.0,
            "dropped": tally.rejected.get("copy", 0),
            "histogram": {
                "edges": [round(i / HISTOGRAM, 4) for i in range(HISTOGRAM + 1)],
                "counts": tally.ratios,
            },
        }
    trained_on = card_of_model.dataset
    return {
        "model": job.model.to_dict(),
        "trained_on": None if trained_on is None else trained_on.to_dict(),
        "checked_against": checked,
        "generation": {
            "sampler": job.sampler,
            "steps": job.steps,
            "guidance": job.guidance,
            "labels": job.labels,
            "seed": job.seed,
        },
        "counts": {
            "images": kept,
            "per_class": per_class,
            "drawn": tally.drawn,
            "rejected": tally.rejected,
        },
        "label_fidelity": tally.agree / tally.judged if tally.judged else None,
        "min_label_confidence": None if gate is None else gate.min_label_confidence,
        "memorisation": memorisation,
        "cas": found.get("cas"),
        "cas_accuracy": found.get("cas_accuracy"),
        "cas_real_accuracy": found.get("cas_real_accuracy"),
        "label_fidelity_ceiling": found.get("label_fidelity_ceiling"),
    }


def headline(card: dict[str, Any]) -> str:
    """The card in one line: drawn, rejected, copies, label fidelity, CAS."""
    c = card["counts"]
    parts = [f"card: {c['images']} kept of {c['drawn']} drawn"]
    parts += [f"{n} rejected as {why}" for why, n in c["rejected"].items()]
    if card["memorisation"] is not None:
        mem = card["memorisation"]
        parts.append(f"{mem['flagged']} copies kept ({mem['rate']:.2%})")
    if card["label_fidelity"] is not None:
        parts.append(f"label fidelity {card['label_fidelity']:.4f}")
    if card["cas"] is not None:
        parts.append(f"CAS {card['cas']:.4f}")
    return ", ".join(parts) + f" ({CARD} beside the manifest)"


def metrics(card: dict[str, Any]) -> dict[str, float]:
    """The card's numbers as MLflow metrics."""
    out = {
        "card_images": card["counts"]["images"],
        "card_drawn": card["counts"]["drawn"],
        **{f"card_rejected_{k}": v for k, v in card["counts"]["rejected"].items()},
    }
    for key in ("label_fidelity", "cas", "cas_accuracy"):
        if card[key] is not None:
            out[f"card_{key}"] = card[key]
    if card["memorisation"] is not None:
        out["card_copy_rate"] = card["memorisation"]["rate"]
        out["card_copies_flagged"] = card["memorisation"]["flagged"]
    return out


def markdown(card: dict[str, Any], output: str) -> str:
    """`card.md`: the card for people."""
    m, g, c = card["model"], card["generation"], card["counts"]
    lines = [
        f"# Generated dataset: {output}",
        "",
        f"Made by model `{m['name']}` version {m['version']} (weights sha256 "
        f"`{m['digest'][:16]}`), {g['sampler']} with {g['steps']} steps, guidance "
        f"{g['guidance']:g}, labels {g['labels']}, seed {g['seed']}.",
    ]
    if card["trained_on"]:
        t = card["trained_on"]
        lines.append(f"Trained on `{t['uri']}` (manifest sha256 `{t['digest'][:16]}`).")
    if card["checked_against"]:
        against = card["checked_against"]
        lines.append(
            f"Each image checked against the train split of `{against['dataset']}` "
            f"(manifest sha256 `{against['digest'][:16]}`)."
        )
    lines += ["", "## Counts", "", "| class | images |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in c["per_class"].items()]
    rejected = ", ".join(f"{v} as {k}" for k, v in c["rejected"].items()) or "none"
    lines += ["", f"{c['images']} images kept of {c['drawn']} drawn; rejected: {rejected}."]
    lines += ["", "## Labels", ""]
    if card["label_fidelity"] is None:
        lines.append("Not judged: the model is unconditional, or no labelled dataset is known.")
    else:
        least = card["min_label_confidence"]
        lines.append(
            f"Label fidelity: {card['label_fidelity']:.4f} of the kept images are their "
            "label by the judge (a classifier trained on the real train split)"
            + (f"; real validation images score {card['label_fidelity_ceiling']:.4f}."
               if card["label_fidelity_ceiling"] is not None else ".")
        )  # fmt: skip
        if least:
            lines.append(f"Images kept only when the judge gave their label >= {least:g}.")
    if card["cas"] is not None:
        lines.append(
            f"CAS: {card['cas']:.4f} (a classifier trained on these images scores "
            f"{card['cas_accuracy']:.4f} on the real validation split, one trained on as "
            f"many real images {card['cas_real_accuracy']:.4f})."
        )
    lines += ["", "## Copies of training images", ""]
    mem = card["memorisation"]
    if mem is None:
        lines.append("Not checked.")
    else:
        lines.append(
            f"{mem['flagged']} images ({mem['rate']:.2%}) have a copy ratio below "
            f"{mem['max_copy_ratio']:g} (the distance to the nearest training image over the "
            f"mean distance to the 50 nearest; 0 is an exact copy); {mem['dropped']} more "
            "were dropped and drawn again."
        )
        lines += ["", "| copy ratio | images |", "|---|---|"]
        edges, counts = mem["histogram"]["edges"], mem["histogram"]["counts"]
        for lo, hi, n in zip(edges, edges[1:], counts, strict=False):
            if n:
                lines.append(f"| {lo:.2f} to {hi:.2f} | {n} |")
    lines += ["", "## Images", "", f"![the first images of each class]({GRID})", ""]
    return "\n".join(lines)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    from pipeline.data.transforms import encode_png

    return encode_png(Image.fromarray(image))
