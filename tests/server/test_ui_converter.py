"""The UI-workflow -> API-prompt converter and the CPU overrides the server tier uses (plain: no server)."""
import pytest

from comfyui_personalize.headless.comfy_server import cpu_overrides, ui_workflow_to_api

INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}},
    "Encode": {"input": {"required": {"clip": ["CLIP"], "text": ["STRING", {"multiline": True}]}}},
    "Sampler": {"input": {"required": {"model": ["MODEL"], "positive": ["CONDITIONING"], "seed": ["INT", {}],
                                       "steps": ["INT", {}], "cfg": ["FLOAT", {}]},
                          "optional": {"noise": ["INT", {"control_after_generate": True}], "tag": ["STRING", {}]}}},
    "Forced": {"input": {"required": {"value": ["INT", {"forceInput": True}], "scale": ["FLOAT", {}]}}},
    "Pass": {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {}]}}},
}


def _node(id_, type_, inputs=(), widgets=None, mode=0, outputs=None):
    n = {"id": id_, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": outputs or []}
    if widgets is not None:
        n["widgets_values"] = widgets
    return n


def _workflow(link_format="list"):
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 5, 0, 3, 0, "MODEL"], [3, 2, 0, 3, 1, "CONDITIONING"],
             [4, 9, 0, 3, 2, "INT"], [5, 7, 0, 4, 0, "INT"], [6, 8, 0, 2, 0, "CLIP"], [7, 10, 0, 3, 3, "INT"]]
    nodes = [
        _node(1, "Loader", widgets=["b.safetensors"]),
        _node(2, "Encode", [{"name": "clip", "type": "CLIP", "link": 6},
                            {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None}], ["hi"]),
        _node(3, "Sampler", [{"name": "model", "type": "MODEL", "link": 2},
                             {"name": "positive", "type": "CONDITIONING", "link": 3},
                             {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 4},
                             {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 7}],
              [7, "randomize", 20, 6.5, 3, True, "x"]),
        _node(4, "Forced", [{"name": "value", "type": "INT", "link": 5}], [0.5]),
        _node(5, "Pass", [{"name": "model", "type": "MODEL", "link": 1}], [1.0], mode=4,
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [2]}]),
        _node(6, "Note", widgets=["just a note"]),
        _node(7, "Loader", widgets=["a.safetensors"], mode=2),  # muted: dropped, its link too
        _node(8, "Reroute", [{"name": "", "type": "*", "link": 8}],
              outputs=[{"name": "", "type": "CLIP", "links": [6]}]),
        _node(9, "Sampler", widgets=[1, "fixed", 2, 3.0]),
        _node(10, "PrimitiveNode", widgets=[33], outputs=[{"name": "INT", "type": "INT", "links": [7]}]),
        _node(11, "Encode", [{"name": "clip", "type": "CLIP", "link": None}], ["ignored"]),
    ]
    links.append([8, 11, 0, 8, 0, "CLIP"])
    if link_format == "dict":
        links = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk)) for lk in links]
    return {"last_node_id": 11, "last_link_id": 8, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


@pytest.mark.parametrize("link_format", ["list", "dict"])
def test_ui_workflow_to_api_maps_links_widgets_and_modes(link_format):
    api = ui_workflow_to_api(_workflow(link_format), INFO)
    assert set(api) == {"1", "2", "3", "4", "9", "11"}  # bypassed, muted, note, reroute, primitive dropped
    assert api["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}, "_meta": {"title": "Loader"}}
    assert api["2"]["inputs"] == {"clip": ["11", 0], "text": "hi"}
    # model: through the bypassed Pass to the Loader; seed linked (value consumed, control skipped);
    # steps from a PrimitiveNode -> its stored widget value; optional noise's control value (bool) skipped too
    assert api["3"]["inputs"] == {"model": ["1", 0], "positive": ["2", 0], "seed": ["9", 0], "steps": 20,
                                  "cfg": 6.5, "noise": 3, "tag": "x"}
    assert api["4"]["inputs"] == {"scale": 0.5}  # forceInput takes no widget value; its muted source is dropped
    assert api["9"]["inputs"] == {"seed": 1, "steps": 2, "cfg": 3.0}  # missing optional widgets left out


def test_ui_workflow_to_api_fills_missing_widget_values_like_the_frontend():
    info = {"Save": {"input": {"required": {"prefix": ["STRING", {"default": "ComfyUI"}], "kind": [["png", "webp"]]}}}}
    api = ui_workflow_to_api({"nodes": [_node(1, "Save")], "links": []}, info)  # no widgets_values at all
    assert api["1"]["inputs"] == {"prefix": "ComfyUI", "kind": "png"}


def test_ui_workflow_to_api_seed_without_control_widget():
    """A seed whose schema says control_after_generate=False has no control value after it (the frontend adds
    none), so a following boolean is a real widget value, not a control to skip."""
    info = {"Gen": {"input": {"required": {"seed": ["INT", {"control_after_generate": False}],
                                           "flag": ["BOOLEAN", {}], "n": ["INT", {}]}}}}
    api = ui_workflow_to_api({"nodes": [_node(1, "Gen", widgets=[5, True, 3])], "links": []}, info)
    assert api["1"]["inputs"] == {"seed": 5, "flag": True, "n": 3}


def test_ui_workflow_to_api_rejects_unknown_node():
    wf = {"nodes": [_node(1, "NotInstalled", widgets=[])], "links": []}
    with pytest.raises(ValueError, match="NotInstalled"):
        ui_workflow_to_api(wf, INFO)


def test_cpu_overrides_shrinks_without_touching_links_or_input():
    api = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 4}},
           "2": {"class_type": "KSampler", "inputs": {"steps": 30, "cfg": 7, "latent_image": ["1", 0]}},
           "3": {"class_type": "X", "inputs": {"steps": ["2", 0]}},
           "4": {"class_type": "Dataset", "inputs": {"resolution": 1024, "flip": True}},
           "5": {"class_type": "Prior", "inputs": {"num_class_images": 200, "steps": 30, "cfg": 7.0, "width": 0,
                                                   "height": 0}}}
    out = cpu_overrides(api)
    assert out["1"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert out["2"]["inputs"] == {"steps": 2, "cfg": 7, "latent_image": ["1", 0]}
    assert out["3"]["inputs"] == {"steps": ["2", 0]}
    assert out["4"]["inputs"] == {"resolution": 64, "flip": True}
    # width/height 0 take their size from elsewhere (the Prior's dataset buckets): they stay 0
    assert out["5"]["inputs"] == {"num_class_images": 2, "steps": 2, "cfg": 7.0, "width": 0, "height": 0}
    assert api["1"]["inputs"]["width"] == 512 and api["2"]["inputs"]["steps"] == 30
    api["6"] = {"class_type": "PersonalizeRankByReward", "inputs": {"top_k": 2}}
    assert cpu_overrides(api)["1"]["inputs"] == {"width": 64, "height": 64, "batch_size": 4}  # candidates to rank
