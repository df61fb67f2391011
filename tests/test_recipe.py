import json
import pathlib

import pytest

import tjac
from tjac.trajectory import Problem


def test_paper_recipe_matches_the_paper():
    r = tjac.Recipe.paper()
    assert r.model.hidden == (64,) and r.model.activation == "gelu_tanh"
    assert r.optim.name == "sgd" and r.optim.lr == 0.1 and r.optim.momentum == 0.9
    assert r.optim.schedule == "cosine" and r.batch_size == 64 and r.epochs == 25
    assert r.dtype == "float64"
    p = Problem(r)
    assert p.data.x_train.shape == (1600, 64) and p.data.x_test.shape == (197, 64)
    assert float(p.data.x_train.max()) == 1.0 and float(p.data.x_train.min()) == 0.0
    assert p.num_steps == 625 and p.num_params == 64 * 64 + 64 + 64 * 10 + 10 == 4810
    # consecutive batches, same order every epoch
    x0, _ = p.batch(0)
    x25, _ = p.batch(25)
    assert (x0 == p.data.x_train[:64]).all() and (x25 == x0).all()
    assert (p.batch(24)[0] == p.data.x_train[1536:1600]).all()


def test_paper_schedule_and_adam_variant():
    from tjac.optim import learning_rate

    r = tjac.Recipe.paper()
    assert learning_rate(r.optim, 0, 625) == pytest.approx(0.1)
    assert learning_rate(r.optim, 312, 625) == pytest.approx(0.05 * (1 + __import__("math").cos(__import__("math").pi * 312 / 625)))
    a = tjac.Recipe.paper(optimizer="adam")
    assert a.optim.lr == 3e-3 and a.optim.eps_root == 1e-8 and a.optim.eps == 1e-8


def test_json_round_trip_and_stable_hash():
    r = tjac.Recipe.paper(width=32, depth=2, optimizer="adam", data="white_noise", seed=3)
    text = r.to_json()
    back = tjac.Recipe.from_json(text)
    assert back == r and back.hash() == r.hash()
    assert json.loads(text)["model"]["hidden"] == [32, 32]
    assert tjac.Recipe.paper().hash() != tjac.Recipe.paper(seed=1).hash()
    assert tjac.Recipe.paper().hash() == tjac.Recipe.from_json(tjac.Recipe.paper().to_json()).hash()


def test_recipe_hashes_are_pinned():
    """Run ids are recipe hashes: a change to the canonical JSON or to the hash orphans every stored
    run. Pinned literals, not the code compared with itself: the paper recipe's canonical JSON and
    hash, and the tiny recipe's JSON and hash exactly as tjac 0.1.0 wrote them into
    tests/fixtures/store-v0.1.0.zarr (its run is named by that hash)."""
    import hashlib

    paper = tjac.Recipe.paper()
    canonical = ('{"batch_size":64,"data":{"n_train":null,"name":"digits","shuffle":"none",'
                 '"shuffle_seed":0,"split_seed":0,"test_size":197,"variant":"clean","variant_seed":0},'
                 '"device":"cpu","dtype":"float64","epochs":25,"model":{"activation":"gelu_tanh",'
                 '"dropout":0.0,"family":"mlp","hidden":[64],"weight_init":"lecun_normal"},'
                 '"optim":{"beta1":0.9,"beta2":0.999,"eps":1e-08,"eps_root":1e-08,"lr":0.1,'
                 '"momentum":0.9,"name":"sgd","nesterov":false,"schedule":"cosine","warmup_steps":0,'
                 '"weight_decay":0.0},"schema":1,"seed":0}')
    assert paper.to_json() == canonical
    without_device = json.dumps({k: v for k, v in json.loads(canonical).items() if k != "device"},
                                sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(without_device.encode()).hexdigest()[:16] == "cd1c588f7c99f566"
    assert paper.hash() == "cd1c588f7c99f566"
    assert paper.replace(device="cuda").hash() == "cd1c588f7c99f566"  # device excluded
    tiny = tjac.Recipe.paper(width=4, epochs=2, n_train=128, batch_size=32)
    assert tiny.hash() == "55cea24595dcd654"
    fixture = pathlib.Path(__file__).parent / "fixtures" / "store-v0.1.0.zarr" / "runs"
    written = json.loads((fixture / "55cea24595dcd654" / "zarr.json").read_text())["attributes"]
    assert written["recipe_hash"] == "55cea24595dcd654" and written["recipe"] == tiny.to_json()


@pytest.mark.parametrize("kw, msg", [
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(width=0), "`width` must be a positive integer"),
    (dict(width=-3), "`width` must be a positive integer"),
    (dict(epochs=0), "`epochs` must be a positive integer"),
    (dict(depth=0), "`depth` must be a positive integer"),
    (dict(dtype="float16"), "unknown dtype 'float16'"),
    (dict(data="mnist"), "unknown data variant 'mnist'"),
    (dict(activation="swish"), "unknown activation 'swish'"),
    (dict(lr=-0.1), "`lr` must be a positive number"),
])
def test_bad_overrides_give_one_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        tjac.Recipe.paper(**kw)


def test_unknown_model_family_and_override():
    with pytest.raises(ValueError, match="unknown model family 'resnet'"):
        tjac.ModelSpec(family="resnet")
    with pytest.raises(TypeError, match="unknown override"):
        tjac.Recipe.paper(widht=3)
    with pytest.raises(ValueError, match="invalid recipe"):
        tjac.Recipe.from_dict({"model": {"famly": "mlp"}})
