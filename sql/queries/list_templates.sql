-- Lists every registered template, newest version last within each name.
-- No parameters. Returns (namespace, name, version, definition).
select namespace, name, version, definition from task_templates order by namespace, name, id
