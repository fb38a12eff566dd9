"""`harness sensitivity`: which layer groups to keep in higher precision when the rest of the
network runs int8 or fp16, judged by COCO AP — groups (groups.py) and their FLOPs (flops.py),
variants made and measured resumably (variants.py, measure.py, store.py), the ranking and
greedy search (search.py), TensorRT constraints (constraints.py), the experiment (runner.py)
and its report (report.py)."""
