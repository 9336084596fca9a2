"""The upstream side: keep-alive HTTP/1.1 connections to endpoints and their pools."""
