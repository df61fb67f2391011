"""`tjac run`/`info`/`verify` options: the dropped-examples notice and --no-drop-last, what `tjac
info` shows of the optimizer and the recipe it returns as JSON, `tjac verify` on a user's model."""
import json

import pytest

import tjac
from tjac.cli import main
from tjac.query import open as open_store

RUN = ["run", "--width", "4", "--epochs", "1", "--n-train", "80", "--batch-size", "32",
       "--k-top", "2", "--k-bottom", "0", "--method", "lanczos", "--backend", "eager", "--png", "none"]


def test_dropped_examples_are_printed_and_no_drop_last_keeps_them(tmp_path, capsys, caplog):
    store = str(tmp_path / "s.zarr")
    with caplog.at_level("WARNING"):
        assert main([*RUN, "--store", store, "--lr", "0.05", "--clip-norm", "2"]) == 0
    out = capsys.readouterr().out
    note = "16 of the 80 training examples are dropped every epoch"
    assert "T = 2 steps" in out and f"note: {note}" in out  # in the summary table
    assert any(note in m for m in caplog.messages)  # and logged as a warning (stderr)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main([*RUN, "--store", store, "--no-drop-last"]) == 0
    out = capsys.readouterr().out
    assert "T = 3 steps" in out and "dropped every" not in out + " ".join(caplog.messages)
    res = open_store(store)
    keep, kept = sorted((res.run(r) for r in res.runs()), key=lambda r: r.recipe.data.drop_last)
    assert keep.recipe.data.drop_last is False and kept.recipe.data.drop_last is True
    assert keep.summary["T"] == 3 and kept.summary["T"] == 2
    assert kept.summary["batches"]["dropped_per_epoch"] == 16
    assert keep.summary["batches"]["dropped_per_epoch"] == 0
    # the default recipe's hash is the one it had before drop_last existed
    assert kept.id == tjac.Recipe.paper(width=4, epochs=1, n_train=80, batch_size=32, lr=0.05,
                                        clip_norm=2.0).hash()
    assert "drop_last" not in kept.recipe.to_dict()["data"]

    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "sgd lr 0.05 momentum 0.9 cosine clip 2 1 epochs batch 32" in out
    assert "sgd lr 0.1 momentum 0.9 cosine 1 epochs" in out
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for rid, r in info["runs"].items():
        back = tjac.Recipe.from_dict(r["recipe"])
        assert back == res.run(rid).recipe and back.hash() == r["recipe_hash"] == rid


def test_info_shows_a_user_optimizers_import_path(tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    args = ["run", "--model", "usermodels:sequential_mlp", "--model-kwargs", '{"width": 3}',
            "--optimizer", "usermodels:momentum_sign", "--optimizer-kwargs", '{"lr": 0.01}',
            "--clip-norm", "1.5", "--epochs", "1", "--n-train", "64", "--batch-size", "32",
            "--k-top", "2", "--k-bottom", "0", "--method", "lanczos", "--backend", "eager", "--png",
            "none", "-q", "--store", store]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert 'usermodels:momentum_sign({"lr": 0.01}) clip 1.5 1 epochs' in out and "custom" not in out
    assert main(["info", store, "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert r["recipe"]["optim"]["factory"] == "usermodels:momentum_sign"
    assert r["recipe"]["optim"]["kwargs"] == {"lr": 0.01} and r["recipe"]["optim"]["clip_norm"] == 1.5


USER = ["--model", "usermodels:sequential_mlp", "--model-kwargs", '{"width": 3}', "--optimizer",
        "usermodels:momentum_sign", "--clip-norm", "1.0", "--n-train", "80", "--no-drop-last"]


def test_verify_checks_a_users_model_and_optimizer(capsys):
    """JVPs and VJPs of a user's module, optimizer (torch.func) and clipping, with a partial last
    batch, against jacrev through the whole training run; then J restricted by --param-filter."""
    assert main(["verify", *USER]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith('usermodels:sequential_mlp({"width": 3}) on digits, P=247, T=3:')
    assert out.rstrip().endswith(": OK")
    assert main(["verify", *USER, "--param-filter", "5.*"]) == 0
    out = capsys.readouterr().out
    assert "P=40, T=3" in out and out.rstrip().endswith(": OK")  # Linear(3, 10): 30 + 10


def test_verify_reports_disagreement_with_exit_1(capsys):
    """A tolerance below round-off: the operator and the oracle differ in the last bits, and
    verify says so with exit code 1."""
    assert main(["verify", *USER, "--rtol", "1e-300"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("DISAGREE")


@pytest.mark.parametrize("args, msg", [
    (["--model", "usermodels:plain_mlp"], "P = 4,810 parameters is too many for the dense oracle"),
    (["--model", "usermodels:sequential_mlp", "--max-params", "100"], "at most 100"),
    (["--model", "usermodels:sequential_mlp", "--model-kwargs", '{"depth": 2}'],
     "takes no argument 'depth'"),
    (["--optimizer", "usermodels:momentum_sign", "--lr", "0.1"], "'lr' applies to the built-in"),
    (["--model", "usermodels:nope"], "has no attribute 'nope'"),
    (["--model", "usermodels:sequential_mlp", "--width", "3"], "describe the built-in"),
])
def test_verify_bad_input_is_one_line_exit_2(capsys, args, msg):
    code = main(["verify", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, err


def test_verify_without_options_checks_the_tiny_built_in_recipe(capsys):
    """Unchanged default: the paper's MLP at width 4, 1 epoch of 128 digits at batch 32 (T = 4)."""
    assert main(["verify", "--optimizer", "adam"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("MLP[4] on digits, P=310, T=4:") and out.rstrip().endswith(": OK")
