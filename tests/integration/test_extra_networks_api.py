"""GET/POST of LoRAs and embeddings, and LoRA warnings in txt2img answers, against the shared real server."""
from __future__ import annotations

import json


def test_loras_are_listed_and_refreshed(api, tiny_models):
    loras = api.get(api.base + "/loras").json()
    tiny = [x for x in loras if x["name"] == "tiny-lora"]
    assert tiny and tiny[0]["path"].endswith("tiny-lora.safetensors")
    assert tiny[0]["metadata"]["ss_network_module"] == "networks.lora"
    refreshed = api.post(api.base + "/refresh-loras")
    assert refreshed.status_code == 200 and {x["name"] for x in refreshed.json()} >= {"tiny-lora"}


def test_embeddings_are_listed_as_loaded_for_the_tiny_checkpoint(api):
    body = api.post(api.base + "/refresh-embeddings").json()
    assert body["loaded"]["tiny-emb"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                          "shape": 32, "vectors": 2}
    assert body["loaded"]["tiny-emb-pt"]["step"] == 100
    assert api.get(api.base + "/embeddings").json()["loaded"].keys() == body["loaded"].keys()


def test_txt2img_with_a_lora_and_a_bad_tag(api):
    r = api.post(api.base + "/txt2img", json={"prompt": "a cat <lora:tiny-lora:0.8> <lora:missing:1>", "steps": 2,
                                               "width": 64, "height": 64, "seed": 1})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert any("<lora:missing:1> ignored" in w for w in info["warnings"])
    assert info["extra_generation_params"]["Lora hashes"].startswith("tiny-lora: ")
    assert 'Lora hashes: "tiny-lora: ' in info["infotexts"][0]
