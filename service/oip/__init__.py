"""The Open Inference Protocol (KServe v2 / Triton) front doors: REST routes under /v2
(``rest``) and a gRPC service (``grpc_server``), both over ``protocol`` and the predictor."""
