"""What a file is — an ONNX graph's output convention, NMS node and settings, TopK nodes and
candidate tensors — read from the file itself (docs/design.md: "never guessed")."""
