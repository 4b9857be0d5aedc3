"""Headless training of HistoScope's model families."""
