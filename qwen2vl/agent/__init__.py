"""A GUI agent: a vision-language model looks at screenshots and acts (click, type, scroll, back) in an environment."""
