"""Your own model: a small CNN with BatchNorm and dropout on the digits as 1x8x8 images.

    python examples/own_model.py [STORE]

Trains it once, certifies the top-16 and bottom-16 singular values of J = d theta_T / d theta_0,
prints the region counts and writes the figure. The module is an ordinary ``nn.Module``: tjac calls
it through ``torch.func.functional_call``, carries BatchNorm's running statistics alongside
training (J is with respect to the parameters only) and replays dropout with the same masks.
From the command line the same model is ``tjac run --model own_model:small_cnn`` (run in this
folder: the working directory is importable; the default digits arrive as 64-pixel rows, which the
forward reshapes).
"""
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tjac
from tjac import runner
from tjac.plotting import spectrum_figure


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 4, p: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(channels * 16, 10)
        self.c = channels

    def forward(self, x):                      # x: (B, 1, 8, 8), or the digits' (B, 64) rows
        h = torch.tanh(self.bn(self.conv(x.reshape(-1, 1, 8, 8))))
        h = h.reshape(-1, self.c, 4, 2, 4, 2).mean((3, 5))     # 2x2 average pool
        return self.head(self.drop(h).reshape(h.shape[0], -1))


def small_cnn(channels: int = 4, p: float = 0.1) -> nn.Module:
    return SmallCNN(channels, p)


def digits_as_images():
    """sklearn's digits as (N, 1, 8, 8) images, split as in the paper."""
    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=197, random_state=0)
    return x_tr, y_tr, x_te, y_te


def main(store: str) -> None:
    recipe = tjac.Recipe.paper(model=small_cnn, dataset=digits_as_images(), epochs=5)
    # auto: below P = 6000 J is formed column block by column block and both ends come from it
    out = runner.run_analysis(recipe, store, k_top=16, k_bottom=16, backend="eager")
    run = tjac.open(store).run(out.run_id)
    print(f"P = {run.P}; top sigma {np.round(run.top(4).sigma, 4)} ...; "
          f"bottom sigma {np.round(run.bottom(4).sigma, 6)} ...")
    print("regions at eps = 1e-3:", run.regions(1e-3))
    print("figure:", spectrum_figure(run, store.removesuffix(".zarr") + ".png"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/own_model.zarr")
