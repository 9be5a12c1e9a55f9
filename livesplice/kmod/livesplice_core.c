// SPDX-License-Identifier: GPL-2.0
/*
 * livesplice core: switches kernel functions to new code, and back, under stop_machine().
 *
 * Everything clever happens in user space (livesplice's Python side): it matches the pre code
 * against the running kernel, loads the new code as a module and resolves every address. This
 * module only does what must happen with the machine stopped: check that no thread's kernel stack
 * holds an address inside the code being replaced, check that the bytes to be overwritten are the
 * ones user space matched, write (or restore) the 5-byte jumps, and remember what it wrote.
 *
 * Interface (debugfs, root only), /sys/kernel/debug/livesplice/:
 *   control  write a request (see parse_request), read the result of the last one
 *   state    the applied updates, in stacking order
 */

#include <linux/module.h>
#include <linux/debugfs.h>
#include <linux/kallsyms.h>
#include <linux/stop_machine.h>
#include <linux/sched/signal.h>
#include <linux/sched/task_stack.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/delay.h>
#include <linux/ktime.h>
#include <linux/mutex.h>
#include <linux/list.h>
#include <linux/seq_file.h>
#include <asm/sync_core.h>

#define JMP_SIZE 5
#define MAX_FUNCS 256
#define MAX_RANGES 1024
#define ID_LEN 48

static unsigned long text_poke_addr;
module_param(text_poke_addr, ulong, 0400);
MODULE_PARM_DESC(text_poke_addr, "address of text_poke_kgdb() (from /proc/kallsyms)");

typedef void *(*text_poke_fn)(void *addr, const void *opcode, size_t len);

struct ls_func {
	char name[KSYM_NAME_LEN];
	unsigned long site;		/* where the jump goes: old function + fentry size */
	unsigned long target;		/* the new function */
	u8 expect[JMP_SIZE];		/* the bytes user space matched at site */
	u8 saved[JMP_SIZE];		/* what the site held before this update */
};

struct ls_range {
	unsigned long start, end;	/* [start, end): code no thread may be in */
	int func;			/* index into funcs, for the message */
};

struct ls_update {
	struct list_head list;
	char id[ID_LEN];
	struct module *mod;		/* the new code, pinned while applied */
	int nfuncs, nranges;
	struct ls_func *funcs;
	struct ls_range *ranges;	/* checked on apply */
	struct ls_range *new_ranges;	/* checked on undo: the new code itself */
	int nnew_ranges;
	u64 pause_ns, work_ns;
};

static LIST_HEAD(updates);		/* oldest first */
static DEFINE_MUTEX(ls_mutex);
static char result[512];
static struct dentry *dir;

/* --- the stopped machine ------------------------------------------------------------------ */

struct ls_switch {
	struct ls_update *u;
	bool undo;
	int busy_func;
	char busy_comm[TASK_COMM_LEN];
	pid_t busy_pid;
	int mismatch_func;
	u64 work_ns;
};

static bool addr_in(unsigned long v, struct ls_range *r, int n, int *which)
{
	int i;

	for (i = 0; i < n; i++) {
		if (v >= r[i].start && v < r[i].end) {
			*which = r[i].func;
			return true;
		}
	}
	return false;
}

/* Conservative: any word on a thread's stack, from its saved stack pointer up, that points into
 * the code counts as that thread being inside it. */
static bool stacks_busy(struct ls_switch *s, struct ls_range *r, int n)
{
	struct task_struct *g, *t;
	int which;

	for_each_process_thread(g, t) {
		unsigned long *base = task_stack_page(t), *p, *end;

		if (!base)
			continue;
		end = (unsigned long *)((char *)base + THREAD_SIZE);
		/* Our own stack only from here up: below lie stale words of earlier calls (for
		 * instance the sites a previous try passed to text_poke). */
		p = t == current ? (unsigned long *)current_stack_pointer
				 : (unsigned long *)t->thread.sp;
		if (p < base || p >= end)
			p = base;
		for (; p < end; p++) {
			if (addr_in(*p, r, n, &which)) {
				s->busy_func = which;
				s->busy_pid = task_pid_nr(t);
				memcpy(s->busy_comm, t->comm, TASK_COMM_LEN);
				return true;
			}
		}
	}
	return false;
}

static void make_jump(u8 *insn, unsigned long site, unsigned long target)
{
	s32 rel = (s32)(target - (site + JMP_SIZE));

	insn[0] = 0xe9;
	memcpy(insn + 1, &rel, sizeof(rel));
}

static int do_switch(void *data)
{
	struct ls_switch *s = data;
	struct ls_update *u = s->u;
	text_poke_fn poke = (text_poke_fn)text_poke_addr;
	u64 start = ktime_get_ns();
	u8 jump[JMP_SIZE] = { 0 };
	int i;

	/* stop_machine() runs this on one CPU while every other CPU spins with interrupts off. */
	if (s->undo ? stacks_busy(s, u->new_ranges, u->nnew_ranges)
		    : stacks_busy(s, u->ranges, u->nranges))
		return -EBUSY;
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (s->undo) {
			make_jump(jump, f->site, f->target);
			if (memcmp((void *)f->site, jump, JMP_SIZE)) {
				s->mismatch_func = i;
				return -EILSEQ;
			}
		} else if (memcmp((void *)f->site, f->expect, JMP_SIZE)) {
			s->mismatch_func = i;
			return -EILSEQ;
		}
	}
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (s->undo) {
			poke((void *)f->site, f->saved, JMP_SIZE);
		} else {
			memcpy(f->saved, (void *)f->site, JMP_SIZE);
			make_jump(jump, f->site, f->target);
			poke((void *)f->site, jump, JMP_SIZE);
		}
	}
	s->work_ns = ktime_get_ns() - start;
	return 0;
}

static void sync_core_cb(void *unused)
{
	sync_core();
}

/* Stop the machine and switch; if a thread is inside the code, let it go, wait, and retry. */
static int switch_update(struct ls_update *u, bool undo, int tries, int delay_ms)
{
	struct ls_switch s = { .u = u, .undo = undo, .busy_func = -1, .mismatch_func = -1 };
	int attempt, ret = -EBUSY;
	u64 t0;

	for (attempt = 1; attempt <= tries; attempt++) {
		t0 = ktime_get_ns();
		ret = stop_machine(do_switch, &s, NULL);
		u->pause_ns = ktime_get_ns() - t0;
		u->work_ns = s.work_ns;
		if (ret != -EBUSY)
			break;
		if (attempt < tries)
			msleep(delay_ms);
	}
	if (ret == 0) {
		on_each_cpu(sync_core_cb, NULL, 1);
		snprintf(result, sizeof(result), "ok %s %s pause_ns=%llu work_ns=%llu attempts=%d\n",
			 undo ? "undo" : "apply", u->id, u->pause_ns, u->work_ns, attempt);
	} else if (ret == -EBUSY) {
		snprintf(result, sizeof(result), "busy code busy: %s in use by %s[%d] (after %d tries)\n",
			 s.busy_func >= 0 ? u->funcs[s.busy_func].name : "?", s.busy_comm, s.busy_pid,
			 tries);
	} else if (ret == -EILSEQ) {
		snprintf(result, sizeof(result), "mismatch %s: the bytes at %pS are not the ones matched\n",
			 u->funcs[s.mismatch_func].name, (void *)u->funcs[s.mismatch_func].site);
	} else {
		snprintf(result, sizeof(result), "error stop_machine: %d\n", ret);
	}
	return ret;
}

/* --- requests ------------------------------------------------------------------------------- */

static void free_update(struct ls_update *u)
{
	if (!u)
		return;
	kfree(u->funcs);
	kfree(u->ranges);
	kfree(u->new_ranges);
	kfree(u);
}

static struct ls_update *find_update(const char *id)
{
	struct ls_update *u;

	list_for_each_entry(u, &updates, list)
		if (!strcmp(u->id, id))
			return u;
	return NULL;
}

static int parse_hex(const char *hex, u8 *out, int n)
{
	return strlen(hex) == 2 * n ? hex2bin(out, hex, n) : -EINVAL;
}

/*
 * apply ID MODULE_ADDR MODULE_NAME TRIES DELAY_MS
 * f NAME SITE TARGET EXPECT_HEX      one per function
 * r START END FUNC_INDEX             code to find no thread in, on apply
 * n START END FUNC_INDEX             the new code, to find no thread in, on undo
 *
 * undo ID TRIES DELAY_MS
 */
static int handle_apply(char *req)
{
	struct ls_update *u;
	char *line, *id, *modname;
	unsigned long modaddr;
	int tries, delay, ret = -EINVAL;
	char name[KSYM_NAME_LEN], hex[2 * JMP_SIZE + 2];
	struct module *mod;

	line = strsep(&req, "\n");
	u = kzalloc(sizeof(*u), GFP_KERNEL);
	id = kzalloc(ID_LEN, GFP_KERNEL);
	modname = kzalloc(MODULE_NAME_LEN, GFP_KERNEL);
	if (!u || !id || !modname)
		goto nomem;
	u->funcs = kcalloc(MAX_FUNCS, sizeof(*u->funcs), GFP_KERNEL);
	u->ranges = kcalloc(MAX_RANGES, sizeof(*u->ranges), GFP_KERNEL);
	u->new_ranges = kcalloc(MAX_RANGES, sizeof(*u->new_ranges), GFP_KERNEL);
	if (!u->funcs || !u->ranges || !u->new_ranges)
		goto nomem;
	if (sscanf(line, "apply %47s %lx %55s %d %d", id, &modaddr, modname, &tries, &delay) != 5 ||
	    tries < 1 || tries > 1000 || delay < 0 || delay > 60000) {
		snprintf(result, sizeof(result), "error bad apply line\n");
		goto out;
	}
	strscpy(u->id, id, ID_LEN);
	while ((line = strsep(&req, "\n")) != NULL) {
		struct ls_func *f;
		struct ls_range *r;
		unsigned long a, b;
		int idx;

		if (!*line)
			continue;
		if (line[0] == 'f' && u->nfuncs < MAX_FUNCS) {
			f = &u->funcs[u->nfuncs];
			if (sscanf(line, "f %511s %lx %lx %11s", name, &f->site, &f->target, hex) != 4 ||
			    parse_hex(hex, f->expect, JMP_SIZE))
				goto bad_line;
			strscpy(f->name, name, sizeof(f->name));
			u->nfuncs++;
		} else if ((line[0] == 'r' || line[0] == 'n') &&
			   sscanf(line + 1, " %lx %lx %d", &a, &b, &idx) == 3 && a < b &&
			   idx >= 0 && idx < u->nfuncs) {
			if (line[0] == 'r' && u->nranges < MAX_RANGES)
				r = &u->ranges[u->nranges++];
			else if (line[0] == 'n' && u->nnew_ranges < MAX_RANGES)
				r = &u->new_ranges[u->nnew_ranges++];
			else
				goto bad_line;
			r->start = a;
			r->end = b;
			r->func = idx;
		} else {
			goto bad_line;
		}
	}
	if (!u->nfuncs || find_update(u->id)) {
		snprintf(result, sizeof(result), "error %s\n",
			 u->nfuncs ? "an update with this id is applied" : "no functions");
		goto out;
	}
	/* Pin the new code: user space names the module by its __this_module address. */
	mod = (struct module *)modaddr;
	if (strncmp(mod->name, modname, MODULE_NAME_LEN) || !try_module_get(mod)) {
		snprintf(result, sizeof(result), "error module %s is not at %lx\n", modname, modaddr);
		goto out;
	}
	u->mod = mod;
	ret = switch_update(u, false, tries, delay);
	if (ret) {
		module_put(mod);
		goto out;
	}
	__module_get(THIS_MODULE);
	list_add_tail(&u->list, &updates);
	u = NULL;
out:
	free_update(u);
	kfree(id);
	kfree(modname);
	return ret;
bad_line:
	snprintf(result, sizeof(result), "error bad line: %.200s\n", line);
	goto out;
nomem:
	snprintf(result, sizeof(result), "error out of memory\n");
	ret = -ENOMEM;
	goto out;
}

static int handle_undo(char *req)
{
	char id[ID_LEN];
	int tries, delay, i, j, ret;
	struct ls_update *u, *later;

	if (sscanf(req, "undo %47s %d %d", id, &tries, &delay) != 3 || tries < 1 || tries > 1000 ||
	    delay < 0 || delay > 60000) {
		snprintf(result, sizeof(result), "error bad undo line\n");
		return -EINVAL;
	}
	u = find_update(id);
	if (!u) {
		snprintf(result, sizeof(result), "unknown no applied update %s\n", id);
		return -ENOENT;
	}
	/* A later update that patched one of the same sites stacks on this one. */
	later = u;
	list_for_each_entry_continue(later, &updates, list) {
		for (i = 0; i < u->nfuncs; i++)
			for (j = 0; j < later->nfuncs; j++)
				if (u->funcs[i].site == later->funcs[j].site) {
					snprintf(result, sizeof(result),
						 "stacked update %s stacks on %s (%s): undo it first\n",
						 later->id, u->id, u->funcs[i].name);
					return -EBUSY;
				}
	}
	ret = switch_update(u, true, tries, delay);
	if (ret)
		return ret;
	list_del(&u->list);
	module_put(u->mod);
	free_update(u);
	module_put(THIS_MODULE);
	return 0;
}

static int do_nothing(void *unused)
{
	return 0;
}

/* bench N: the pause of N empty stop_machine() calls, to set an update's pause against. */
static int handle_bench(char *req)
{
	int n, i;
	u64 t0, pause, best = U64_MAX, total = 0;

	if (sscanf(req, "bench %d", &n) != 1 || n < 1 || n > 1000) {
		snprintf(result, sizeof(result), "error bad bench line\n");
		return -EINVAL;
	}
	for (i = 0; i < n; i++) {
		t0 = ktime_get_ns();
		stop_machine(do_nothing, NULL, NULL);
		pause = ktime_get_ns() - t0;
		total += pause;
		best = min(best, pause);
	}
	snprintf(result, sizeof(result), "ok bench - mean_ns=%llu min_ns=%llu n=%d\n",
		 div_u64(total, n), best, n);
	return 0;
}

static ssize_t control_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	char *req;
	int ret;

	if (len > 256 * 1024)
		return -E2BIG;
	req = memdup_user_nul(buf, len);
	if (IS_ERR(req))
		return PTR_ERR(req);
	mutex_lock(&ls_mutex);
	if (!strncmp(req, "apply ", 6))
		ret = handle_apply(req);
	else if (!strncmp(req, "undo ", 5))
		ret = handle_undo(req);
	else if (!strncmp(req, "bench ", 6))
		ret = handle_bench(req);
	else {
		snprintf(result, sizeof(result), "error unknown request\n");
		ret = -EINVAL;
	}
	mutex_unlock(&ls_mutex);
	kfree(req);
	return ret ? ret : len;
}

static ssize_t control_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	ssize_t ret;

	mutex_lock(&ls_mutex);
	ret = simple_read_from_buffer(buf, len, ppos, result, strlen(result));
	mutex_unlock(&ls_mutex);
	return ret;
}

static const struct file_operations control_fops = {
	.owner = THIS_MODULE,
	.write = control_write,
	.read = control_read,
	.llseek = default_llseek,
};

static int state_show(struct seq_file *m, void *v)
{
	struct ls_update *u;
	int i;

	mutex_lock(&ls_mutex);
	list_for_each_entry(u, &updates, list) {
		seq_printf(m, "update %s %s %d pause_ns=%llu work_ns=%llu\n", u->id, u->mod->name,
			   u->nfuncs, u->pause_ns, u->work_ns);
		for (i = 0; i < u->nfuncs; i++)
			seq_printf(m, "func %s %s %lx %lx %*phN\n", u->id, u->funcs[i].name,
				   u->funcs[i].site, u->funcs[i].target, JMP_SIZE, u->funcs[i].saved);
	}
	mutex_unlock(&ls_mutex);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(state);

static int __init livesplice_core_init(void)
{
	if (!text_poke_addr) {
		pr_err("livesplice: text_poke_addr not given\n");
		return -EINVAL;
	}
	dir = debugfs_create_dir("livesplice", NULL);
	debugfs_create_file("control", 0600, dir, NULL, &control_fops);
	debugfs_create_file("state", 0400, dir, NULL, &state_fops);
	return 0;
}

static void __exit livesplice_core_exit(void)
{
	debugfs_remove_recursive(dir);
}

module_init(livesplice_core_init);
module_exit(livesplice_core_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("livesplice core: switches kernel functions under stop_machine");
