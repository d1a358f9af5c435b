"""`offload inspect` and `offload plan` on the published config.json of the newer families alone (the file a
model page shows before any download): parameters, bytes per tier, and a plan for a 24 GB GPU."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from offload.cli import app
from test_ernie4_5_moe import ERNIE_21B, ERNIE_300B
from test_gpt_oss import GPT_OSS_20B, GPT_OSS_120B
from test_hunyuan_v1_moe import HUNYUAN_A13B
from test_llama4 import SCOUT
from test_qwen3_next import QWEN3_5_35B, QWEN3_NEXT_80B


@pytest.mark.parametrize("hf, total", [(ERNIE_21B, "21.8"), (ERNIE_300B, "299.4"), (HUNYUAN_A13B, "80."),
                                       (GPT_OSS_20B, "20.9"), (GPT_OSS_120B, "116.8"), (QWEN3_NEXT_80B, "79.6"),
                                       (QWEN3_5_35B, "34.6"), (SCOUT, "107.7")])
def test_inspect_and_plan_of_a_published_config(tmp_path, hf, total):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert f"{hf['model_type']} ({hf['architectures'][0]})" in text
    assert re.search(rf"parameters {total}\d*B total", text), text
    assert "bf16" in text and "int4" in text  # the weights-by-tier table

    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--gpu-memory", "24GiB", "--dtype", "bfloat16",
                                      "--host-memory", "256GiB", "--experts", "int4", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    text = hf.get("text_config", hf)  # a multimodal checkpoint's text model
    assert len(plan["layers"]) == text["num_hidden_layers"] - text.get("moe_layer_start_index", 0)  # the MoE layers
    assert plan["expert_format"] == "int4"
