"""The TCP transport: the wire protocol and its framing, the control
channel every link uses, data lanes, and both sides of a transfer
(``transport.TcpTransport`` initiates, ``target.DataTarget`` serves)."""
