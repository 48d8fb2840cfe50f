"""Scaling studies: grids of runs over the xLSTM families and the Transformer baseline, their results and fits."""
