"""Other methods this plugin implements beside LARV: LiNeS (on the wrapper skeleton) and LOT Merging."""
