"""What training, serving and the client share, so that they cannot drift apart: the encoder export
format and its loader, the architectures it names, image decoding, the evaluation preprocessing,
the InstDisc kNN vote, the gRPC API (generated from proto/), option definitions and file helpers.
Nothing here imports the trainer, the server or the client."""
