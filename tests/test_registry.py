"""Model cards: the whole architecture travels with the weights, and cards of
models registered before templates (which named a preset) still load."""

from pipeline.config.records import Lineage, ModelCard
from pipeline.edges.registry import Model
from pipeline.maths.architecture import architecture
from pipeline.maths.unet import build


def test_a_card_holds_the_network_that_the_weights_belong_to():
    net = architecture("small", 16, channels=32, num_classes=10, label_dropout=0.1)
    card = ModelCard.from_dict(
        {"template": "small", "model": net.to_dict(), "resolution": 16, "classes": None}
    )
    model = Model(card, b"", Lineage("m", 1, None, "0" * 64))
    assert model.architecture() == net and model.describe() == "m/1"
    # the rebuilt network takes the trained one's weights, key for key
    build("small", 16, channels=32, num_classes=10).load_state_dict(
        build("small", 16, channels=32, num_classes=10, label_dropout=0.1).state_dict()
    )


def test_a_card_from_before_templates_resolves_its_preset_at_its_resolution():
    # version 0.1.0 registered {"preset": "tiny", "model": {overrides}, "resolution": 8}
    old = {
        "preset": "tiny",
        "model": {"num_classes": 10, "label_dropout": 0.1},
        "resolution": 8,
        "classes": [str(d) for d in range(10)],
    }
    card = ModelCard.from_dict(old)
    assert card.template == "tiny" and "preset" not in card.to_dict()
    assert card.model == architecture("tiny", 8, num_classes=10, label_dropout=0.1)
    assert card.resolution == 8 and card.classes == tuple(old["classes"])
    # same layout as the 0.1.0 preset: attention at 4x4, 0.43M parameters
    assert build("tiny", 8, num_classes=10).parameter_count() == 427_827
