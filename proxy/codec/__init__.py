"""HTTP/1.1 codec helpers that the client and upstream sides share: head rewriting, flow control."""
