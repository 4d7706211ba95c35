"""What only energy models have: quantities of an in-batch contrastive batch (duplicate actions,
effective negatives, context collapse, the temperature against the dtype's range).

A layer between the generic engine and the rules: it computes numbers from a batch and its
energy matrix; ``findings`` judges them.
"""
