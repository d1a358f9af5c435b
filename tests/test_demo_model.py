"""The demo model that ships inside the package (offload/demo_model/, tools/train_demo_model.py)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import offload
from offload.cli import app
from offload.demo import demo_model

PROMPT = "What is a list comprehension?"
# Greedy, no penalty: what the shipped weights say (a 12 M-parameter model loops without a repetition penalty).
EXPECTED_REPLY = "The type of the type of the type, and the type of the type.  The type of the type is a"


@pytest.fixture(scope="module")
def model():
    return offload.load(demo_model(), device="cpu", max_context=512)


def test_shipped_checkpoint_is_small_and_records_its_training():
    folder = demo_model()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 30 * 2**20
    record = json.loads((folder / "training.json").read_text())
    assert record["validation_loss"] < 4.5 and "Python" in record["source"]


def test_logits_match_transformers(model):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(demo_model(), dtype=torch.float32).eval()
    ids = model.chat_prompt([{"role": "user", "content": PROMPT}])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    got = model.logits(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_fixed_prompt_gives_a_fixed_greedy_reply(model):
    reply = model.chat([{"role": "user", "content": PROMPT}], max_new_tokens=24)
    assert reply.text == EXPECTED_REPLY


def test_routing_is_far_from_uniform(model):
    model.reset_stats()
    model.chat([{"role": "user", "content": "How do I read a file line by line?"}], max_new_tokens=32)
    heat = torch.tensor(model.routing_heat(), dtype=torch.float32)  # [layer, expert]
    usage = heat / heat.sum(-1, keepdim=True)
    entropy = -(usage * usage.clamp_min(1e-12).log2()).sum(-1)
    assert (entropy < 0.95 * torch.log2(torch.tensor(float(heat.shape[1])))).all()


def test_demo_command_runs_end_to_end(model):
    result = CliRunner().invoke(app, ["demo", "--device", "cpu", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    reply = result.stdout.split("assistant:", 1)[1].strip()
    # The command samples greedily with a repetition penalty: the same reply as the API with those settings.
    expected = model.chat([{"role": "user", "content": PROMPT}], max_new_tokens=24, top_k=40, repetition_penalty=1.3)
    assert reply.startswith(expected.text.strip()) and len(expected.text) > 40
    assert "tokens" in result.output  # the stats line
    path = CliRunner().invoke(app, ["demo", "--path"])
    assert path.exit_code == 0 and path.stdout.strip() == str(demo_model())
