"""Process plumbing shared by the stages: joining or starting Ray, and the OS locks that keep two writers apart."""
