"""How good a trained CLT is, measured the same way for every recipe (benchmarks/quality.py, `clt demo`).

replacement.py   the replacement model: MLPs replaced by the CLT -> next-token KL and top-1
                 agreement with the original model (all layers at once, and one at a time)
held_out.py      held-out explained variance / NMSE / L0 per layer on cached datasets
"""
