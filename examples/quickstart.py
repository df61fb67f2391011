"""tjac in fifteen lines: the training Jacobian of a small digits MLP, its top and bottom ends."""
import torch

import tjac

recipe = tjac.Recipe.paper(width=16, epochs=3)          # Recipe.paper() is the paper's exact setup
op = tjac.TrainingJacobian(recipe)                      # trains once; J is never formed
print("P =", op.shape[0], "| check:", op.check())

v = torch.randn(op.shape[0], 4, dtype=torch.float64)
print("||J v|| for 4 random v:", op.matmat(v).norm(dim=0))

top = tjac.svd(op, 8, which="top", method="lanczos")    # certified: residuals from fresh products
bottom = tjac.svd(op, 8, which="bottom")                # auto: dense J for small P
print("top sigma:   ", top.S.numpy().round(4), f"({top.num_matvecs}+{top.num_rmatvecs} products)")
print("bottom sigma:", bottom.S.numpy().round(6), "max residual", float(bottom.certificate.max()))
