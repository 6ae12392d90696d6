"""Serving guards over HTTP and watching their inputs for drift."""
