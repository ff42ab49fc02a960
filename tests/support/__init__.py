"""Helpers shared by the component and end-to-end tests: speech made with espeak-ng, and a real whisperd
process on a real socket."""
