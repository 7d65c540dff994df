"""The Tulle data-plane proxy."""
