"""Stages: plain functions over paths and a typed stage config."""
