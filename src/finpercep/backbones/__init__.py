"""Pretrained feature networks that install offline (weights shipped inside packages)."""
