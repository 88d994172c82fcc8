"""Model cards: the whole architecture travels with the weights, and cards of
models registered before templates (which named a preset) still load."""

from pipeline.edges.registry import Model, _complete
from pipeline.maths.architecture import architecture
from pipeline.maths.unet import build


def test_a_card_holds_the_network_that_the_weights_belong_to():
    net = architecture("small", 16, channels=32, num_classes=10, label_dropout=0.1)
    card = _complete({"template": "small", "model": net.to_dict(), "classes": None})
    assert card["resolution"] == 16
    model = Model(card, b"", {"name": "m", "version": 1})
    assert model.architecture() == net
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
    card = _complete(old)
    assert "preset" not in card and card["template"] == "tiny"
    assert card["model"] == architecture("tiny", 8, num_classes=10, label_dropout=0.1).to_dict()
    # same layout as the 0.1.0 preset: attention at 4x4, 0.43M parameters
    assert build("tiny", 8, num_classes=10).parameter_count() == 427_827
