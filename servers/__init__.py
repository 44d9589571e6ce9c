"""Programs installed as console scripts; the logic lives in the tensorcom package."""
