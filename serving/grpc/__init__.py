"""The gRPC front: servicer (inference.GRPCInferenceService and its port), wire (ModelInferRequest
to neutral tensors and back), streams (one ModelStreamInfer call: requests started as they
arrive, replies in order), boundary (status codes, the one `rpc` decorator), bounds (a message's
entries bounded before it is parsed), health, auth (TLS, the token interceptor).
"""
