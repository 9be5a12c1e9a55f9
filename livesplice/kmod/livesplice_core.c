// SPDX-License-Identifier: GPL-2.0
/*
 * livesplice core: switches kernel functions to new code, and back, with the machine stopped.
 *
 * Everything clever happens in user space (livesplice's Python side): it matches the pre code
 * against the running kernel, loads the new code as a module and resolves every address. This
 * module only does what must happen in the kernel: validate the request, stop every CPU, check
 * that no thread is inside the code being replaced (walking each stack with the kernel's own
 * unwinder), check that the bytes to be overwritten are the ones user space matched, write (or
 * restore) the 5-byte jumps int3-first, and remember what it wrote.
 *
 * Interface: the character device /dev/livesplice. Each open file carries one request and its
 * answer: write the whole request in one write(), then read the answer. The grammar is in
 * docs/core-protocol.md (LIVESPLICE_PROTOCOL below is its version); livesplice/coreproto.py is
 * the user-space side.
 *
 * Kernel functions that are not exported (text_poke_kgdb, find_module, ...) are called directly:
 * `apply` turns their undefined symbols into absolute ones at their /proc/kallsyms addresses
 * before loading this module. Nothing is called through a pointer to an unexported function
 * (with IBT, a sealed ENDBR makes such a call fault).
 */

#include <linux/module.h>
#include <linux/ctype.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/kallsyms.h>
#include <linux/stop_machine.h>
#include <linux/cpu.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/sched/task_stack.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/uaccess.h>
#include <linux/delay.h>
#include <linux/ktime.h>
#include <linux/mutex.h>
#include <linux/list.h>
#include <linux/kdebug.h>
#include <linux/jump_label.h>
#include <linux/static_call.h>
#include <linux/memory.h>
#include <linux/rcupdate.h>
#include <linux/kprobes.h>
#include <linux/task_work.h>
#include <linux/wait.h>
#include <linux/completion.h>
#include <linux/ftrace.h>
#include <linux/nmi.h>
#include <linux/rethook.h>
#include <asm/sync_core.h>
#include <asm/text-patching.h>
#include <asm/unwind.h>

#define LIVESPLICE_PROTOCOL 2
#define JMP_SIZE 5
#define INT3 0xcc
#define MAX_FUNCS 4096
#define MAX_RANGES 16384
#define MAX_REQUEST (4 << 20)
#define ID_LEN 48
#define MAX_BUSY 8
#define MAX_RANGE_SIZE (1 << 20)
#define MAX_WAIT_MS (10 * 60 * 1000)	/* tries x delay: the lock is held meanwhile */

struct ls_func {
	char name[KSYM_NAME_LEN];
	unsigned long site;		/* where the jump goes: old function + fentry size */
	unsigned long target;		/* the new function */
	u8 expect[JMP_SIZE];		/* the bytes user space matched at site */
	u8 saved[JMP_SIZE];		/* what the site held before this update */
	u8 jump[JMP_SIZE];		/* jmp target */
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
	struct ls_range *ranges;	/* the old code, checked on apply */
	u64 pause_ns, work_ns;
	int attempts;
};

static LIST_HEAD(updates);		/* oldest first */
static DEFINE_MUTEX(ls_mutex);		/* serializes requests and guards `updates` */

/* --- the answer ------------------------------------------------------------------------------ */

struct ls_answer {
	char *buf;
	size_t len, cap;
};

static __printf(2, 3) void say(struct ls_answer *a, const char *fmt, ...)
{
	va_list args;
	int n;

	if (!a->buf)
		return;
	va_start(args, fmt);
	n = vsnprintf(a->buf + a->len, a->cap - a->len, fmt, args);
	va_end(args);
	a->len = min(a->len + n, a->cap - 1);
}

/* --- stack walking ------------------------------------------------------------------------------ */

enum ls_why { LS_RUNNING, LS_SLEEPING, LS_BLOCKED, LS_KTHREAD, LS_UNRELIABLE };

struct ls_busy {
	pid_t pid;
	char comm[TASK_COMM_LEN];
	int func;
	unsigned long addr;		/* where in the code */
	enum ls_why why;
	struct task_struct *task;	/* referenced, for waking; NULL when not wakeable */
};

struct ls_switch {
	struct ls_update *u;
	bool undo;
	/* the rendezvous of all CPUs */
	atomic_t arrived;
	atomic_t acks;
	int gen;
	int done;
	int master;
	int result;
	/* what the check found */
	int nbusy;
	struct ls_busy busy[MAX_BUSY];
	raw_spinlock_t busy_lock;
	bool cpu_busy;			/* a CPU's own stack (its stopper thread) was busy */
	int mismatch_func;
	u64 work_ns;
};

static struct ls_switch *active_switch;	/* set while jumps are half-written: the int3 handler */

static notrace bool addr_in_update(struct ls_switch *s, unsigned long addr, int *func)
{
	struct ls_update *u = s->u;
	int i;

	if (s->undo) {
		/* All of the update's code: replaced functions, new helpers, their .cold parts. */
		struct module *m = __module_text_address(addr);

		if (!m && addr)
			m = __module_text_address(addr - 1);
		*func = 0;
		return m == u->mod;
	}
	for (i = 0; i < u->nfuncs; i++) {
		/* The jump's own bytes, whatever ranges user space sent: a task stopped inside them
		 * would resume in the middle of the jump. */
		if (addr > u->funcs[i].site && addr < u->funcs[i].site + JMP_SIZE) {
			*func = i;
			return true;
		}
	}
	for (i = 0; i < u->nranges; i++) {
		/* Inclusive end: a return address after a call that ends the function. */
		if (addr >= u->ranges[i].start && addr <= u->ranges[i].end) {
			*func = u->ranges[i].func;
			return true;
		}
	}
	return false;
}

static notrace void note_busy(struct ls_switch *s, struct task_struct *t, int func,
			       unsigned long addr, enum ls_why why)
{
	struct ls_busy *b;
	unsigned long flags;
	int i;

	raw_spin_lock_irqsave(&s->busy_lock, flags);
	for (i = 0; i < s->nbusy; i++)
		if (s->busy[i].pid == task_pid_nr(t))
			goto out;
	if (s->nbusy < MAX_BUSY) {
		b = &s->busy[s->nbusy++];
		b->pid = task_pid_nr(t);
		memcpy(b->comm, t->comm, TASK_COMM_LEN);
		b->func = func;
		b->addr = addr;
		b->why = why;
		b->task = NULL;
		if (why == LS_SLEEPING || why == LS_KTHREAD) {
			get_task_struct(t);
			b->task = t;
		}
	}
out:
	raw_spin_unlock_irqrestore(&s->busy_lock, flags);
}

/* The last resort for a stack the unwinder cannot walk: every word from the stack pointer up. */
static notrace bool scan_words(struct ls_switch *s, struct task_struct *t, unsigned long sp,
			       int *func, unsigned long *addr)
{
	unsigned long *base = task_stack_page(t), *p, *end;

	end = (unsigned long *)((char *)base + THREAD_SIZE);
	p = (unsigned long *)sp;
	if (p < base || p >= end)
		p = base;
	for (; p < end; p++) {
		if (addr_in_update(s, *p, func)) {
			*addr = *p;
			return true;
		}
	}
	return false;
}

/*
 * Is task t inside the code? Walk its stack with the kernel's unwinder (ORC on the stock
 * kernels), which recovers return addresses that function-graph tracing and kretprobes replaced,
 * and sees the interrupted address of interrupt and exception frames. The walk stops at the
 * user-mode registers: user space's values are not kernel code in use.
 */
static notrace bool check_task(struct ls_switch *s, struct task_struct *t, bool running)
{
	struct unwind_state state;
	unsigned long addr, sp;
	int func = 0;
	bool reliable = true;
	enum ls_why why;
	bool busy = true;

	if (!try_get_task_stack(t))
		return false;
#ifdef CONFIG_RETHOOK
	/* Recovering a kretprobe's return address WARNs for a runnable task that is not current:
	 * scan such a stack word by word instead. */
	if (!running && task_is_running(t) && !llist_empty(&t->rethooks)) {
		reliable = false;
		goto scan;
	}
#endif
	for (unwind_start(&state, t, NULL, NULL); !unwind_done(&state);
	     unwind_next_frame(&state)) {
		struct pt_regs *regs = unwind_get_entry_regs(&state, NULL);

		if (regs && user_mode(regs))
			break;
		addr = unwind_get_return_address(&state);
		if (!addr) {
			reliable = false;
			break;
		}
		if (addr_in_update(s, addr, &func))
			goto busy;
	}
	if (unwind_error(&state))
		reliable = false;
	busy = false;
	if (reliable)
		goto out;
#ifdef CONFIG_RETHOOK
scan:
#endif
	busy = false;
	sp = running ? current_stack_pointer : t->thread.sp;
	if (!scan_words(s, t, sp, &func, &addr))
		goto out;
	busy = true;
	why = LS_UNRELIABLE;
	goto note;
busy:
	if (running)
		why = LS_RUNNING;
	else if (t->flags & PF_KTHREAD)
		why = (READ_ONCE(t->__state) & TASK_INTERRUPTIBLE) ? LS_KTHREAD : LS_BLOCKED;
	else
		why = (READ_ONCE(t->__state) & TASK_INTERRUPTIBLE) ? LS_SLEEPING : LS_BLOCKED;
note:
	note_busy(s, t, func, addr, why);
out:
	put_task_stack(t);
	return busy;
}

/* Every task but those running now (each CPU walks its own stack: its stopper thread's). */
static notrace void check_sleeping_tasks(struct ls_switch *s)
{
	struct task_struct *g, *t;
	int cpu;

	for_each_process_thread(g, t)
		if (!READ_ONCE(t->on_cpu))
			check_task(s, t, false);
	for_each_online_cpu(cpu) {
		t = idle_task(cpu);
		if (!READ_ONCE(t->on_cpu))
			check_task(s, t, false);
	}
}

/* --- writing the jumps -------------------------------------------------------------------------- */

static void make_jump(u8 *insn, unsigned long site, unsigned long target)
{
	s32 rel = (s32)(target - (site + JMP_SIZE));

	insn[0] = 0xe9;
	memcpy(insn + 1, &rel, sizeof(rel));
}

/*
 * Make every other CPU execute a serializing instruction, and wait until all did. They sit in
 * ls_stopped()'s loop with interrupts off; NMIs still run there, and a CPU acknowledges only
 * between them, so once all acknowledged no NMI that began before the last write is still running.
 */
static notrace void sync_others(struct ls_switch *s)
{
	int others = num_online_cpus() - 1;

	sync_core();
	atomic_set(&s->acks, 0);
	smp_store_release(&s->gen, s->gen + 1);
	while (atomic_read(&s->acks) < others)
		cpu_relax();
}

/*
 * The kernel's own text_poke_bp() protocol, for all sites at once: int3 at each site first, then
 * the tail bytes, then the first byte, every CPU serialized between the steps. A CPU (an NMI
 * handler: nothing else runs) that reaches a site meanwhile traps on the int3, and the die
 * notifier sends it on to the new code, as the finished jump would.
 */
static notrace void write_sites(struct ls_switch *s)
{
	struct ls_update *u = s->u;
	u8 int3 = INT3;
	int i;

	WRITE_ONCE(active_switch, s);
	for (i = 0; i < u->nfuncs; i++)
		text_poke_kgdb((void *)u->funcs[i].site, &int3, 1);
	sync_others(s);
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		text_poke_kgdb((void *)f->site + 1, (s->undo ? f->saved : f->jump) + 1, JMP_SIZE - 1);
	}
	sync_others(s);
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		text_poke_kgdb((void *)f->site, s->undo ? f->saved : f->jump, 1);
	}
	sync_others(s);
	WRITE_ONCE(active_switch, NULL);
}

static notrace int ls_int3(struct notifier_block *nb, unsigned long val, void *data)
{
	struct die_args *args = data;
	struct ls_switch *s = READ_ONCE(active_switch);
	unsigned long ip;
	int i;

	if (val != DIE_INT3 || !s || user_mode(args->regs))
		return NOTIFY_DONE;
	ip = args->regs->ip - 1;	/* the int3 is one byte */
	for (i = 0; i < s->u->nfuncs; i++) {
		if (s->u->funcs[i].site == ip) {
			args->regs->ip = s->u->funcs[i].target;
			return NOTIFY_STOP;
		}
	}
	return NOTIFY_DONE;
}

NOKPROBE_SYMBOL(ls_int3);

static struct notifier_block ls_int3_nb = {
	.notifier_call = ls_int3,
	.priority = INT_MAX,
};

/* The master's work: check, then write. Every other CPU is in ls_stopped()'s loop. */
static notrace int switch_stopped(struct ls_switch *s)
{
	struct ls_update *u = s->u;
	int i;

	check_sleeping_tasks(s);
	if (s->nbusy || s->cpu_busy)
		return -EBUSY;
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (memcmp((void *)f->site, s->undo ? f->jump : f->expect, JMP_SIZE)) {
			s->mismatch_func = i;
			return -EILSEQ;
		}
	}
	if (!s->undo)
		for (i = 0; i < u->nfuncs; i++)
			memcpy(u->funcs[i].saved, (void *)u->funcs[i].site, JMP_SIZE);
	write_sites(s);
	return 0;
}

/*
 * Runs on every online CPU at once, interrupts off (stop_machine with all CPUs). Each CPU first
 * checks its own stack (it runs its stopper thread, whose saved stack pointer is stale); the
 * first to arrive is the master, the others wait in this loop, which calls nothing, until the
 * master is done, serializing whenever the master wrote.
 */
static notrace int ls_stopped(void *data)
{
	struct ls_switch *s = data;
	int n = num_online_cpus(), seen = 0, gen;
	u64 start;

	if (check_task(s, current, true))
		s->cpu_busy = true;
	if (atomic_inc_return(&s->arrived) == 1) {
		s->master = smp_processor_id();
		start = ktime_get_ns();
		while (atomic_read(&s->arrived) < n) {
			touch_nmi_watchdog();
			cpu_relax();
		}
		s->result = switch_stopped(s);
		s->work_ns = ktime_get_ns() - start;
		smp_store_release(&s->done, 1);
		return 0;
	}
	while (!smp_load_acquire(&s->done)) {
		gen = smp_load_acquire(&s->gen);
		if (gen != seen) {
			sync_core();
			seen = gen;
			atomic_inc(&s->acks);
		}
		/* Nothing is called here (no watchdog touch either): it may be the code being
		 * written. The wait is a few milliseconds. */
		cpu_relax();
	}
	sync_core();
	return 0;
}
NOKPROBE_SYMBOL(ls_stopped);

static const char *why_text[] = {
	[LS_RUNNING] = "running",
	[LS_SLEEPING] = "sleeping in a system call; asked to restart it",
	[LS_BLOCKED] = "in uninterruptible sleep: cannot be moved",
	[LS_KTHREAD] = "a kernel thread: woken, it did not leave",
	[LS_UNRELIABLE] = "its stack cannot be walked reliably: found by a scan of every word",
};

/*
 * Parking. A task asleep in a system call inside the code (a shell in do_wait() waiting for
 * livesplice itself) is asked, as livepatch asks the tasks that block its transition, to leave
 * its interruptible sleep without a signal: it returns towards user space with -ERESTARTSYS.
 * There a task work stops it, off the code, until the switch is done; then its system call
 * restarts, through the new code. Without the stop it would be back inside before the next try.
 */
struct ls_park {
	struct callback_head work;
	struct list_head list;
	struct task_struct *task;	/* referenced */
	bool released;
	struct completion left;		/* the task work is done with this struct */
};

static DECLARE_WAIT_QUEUE_HEAD(park_wq);

static void ls_park_fn(struct callback_head *work)
{
	struct ls_park *p = container_of(work, struct ls_park, work);

	wait_event_killable_timeout(park_wq, READ_ONCE(p->released), 60 * HZ);
	complete(&p->left);
}

static bool parked(struct list_head *parks, struct task_struct *t)
{
	struct ls_park *p;

	list_for_each_entry(p, parks, list)
		if (p->task == t)
			return true;
	return false;
}

static void park_busy(struct ls_switch *s, struct list_head *parks)
{
	struct ls_park *p;
	int i;

	for (i = 0; i < s->nbusy; i++) {
		struct task_struct *t = s->busy[i].task;

		if (!t)
			continue;
		if (t->flags & PF_KTHREAD) {
			wake_up_state(t, TASK_INTERRUPTIBLE);
			continue;
		}
		if (parked(parks, t))
			continue;
		p = kzalloc(sizeof(*p), GFP_KERNEL);
		if (!p)
			continue;
		init_task_work(&p->work, ls_park_fn);
		init_completion(&p->left);
		get_task_struct(t);
		p->task = t;
		if (task_work_add(t, &p->work, TWA_SIGNAL)) {
			put_task_struct(t);
			kfree(p);
			continue;
		}
		list_add(&p->list, parks);
	}
}

static bool same_work(struct callback_head *cb, void *data)
{
	return cb == data;
}

static void unpark_all(struct list_head *parks)
{
	struct ls_park *p, *tmp;

	list_for_each_entry(p, parks, list)
		WRITE_ONCE(p->released, true);
	wake_up_all(&park_wq);
	list_for_each_entry_safe(p, tmp, parks, list) {
		/* Not run yet (the task never left its sleep): take the work back; else wait until
		 * the task is done with it. */
		if (!task_work_cancel_match(p->task, same_work, &p->work))
			wait_for_completion(&p->left);
		list_del(&p->list);
		put_task_struct(p->task);
		kfree(p);
	}
}

static void release_busy(struct ls_switch *s)
{
	int i;

	for (i = 0; i < s->nbusy; i++) {
		if (s->busy[i].task)
			put_task_struct(s->busy[i].task);
		s->busy[i].task = NULL;
	}
}

/*
 * Stop the machine and switch; if a thread is inside the code, let the machine go, wake what
 * can be woken, wait, and retry. The lock order is the kernel's own text patchers':
 * cpus_read_lock, text_mutex, stop_machine_cpuslocked.
 */
static int switch_update(struct ls_update *u, bool undo, int tries, int delay_ms,
			 struct ls_answer *a)
{
	struct ls_switch *s;
	const char *op = undo ? "undo" : "apply";
	int attempt, ret = -EBUSY, i;
	LIST_HEAD(parks);
	u64 t0;

	s = kzalloc(sizeof(*s), GFP_KERNEL);
	if (!s)
		return -ENOMEM;
	for (attempt = 1; attempt <= tries; attempt++) {
		release_busy(s);
		memset(s, 0, sizeof(*s));
		raw_spin_lock_init(&s->busy_lock);
		s->u = u;
		s->undo = undo;
		s->mismatch_func = -1;
		cpus_read_lock();
		mutex_lock(&text_mutex);
		t0 = ktime_get_ns();
		ret = stop_machine_cpuslocked(ls_stopped, s, cpu_online_mask);
		u->pause_ns = ktime_get_ns() - t0;
		mutex_unlock(&text_mutex);
		cpus_read_unlock();
		if (!ret)
			ret = s->result;
		u->work_ns = s->work_ns;
		u->attempts = attempt;
		if (ret != -EBUSY)
			break;
		if (attempt < tries) {
			park_busy(s, &parks);
			msleep(delay_ms);
		}
	}
	unpark_all(&parks);
	if (ret == 0) {
		say(a, "ok %s %s pause_ns=%llu work_ns=%llu attempts=%d\n", op, u->id, u->pause_ns,
		    u->work_ns, attempt);
	} else if (ret == -EBUSY) {
		struct ls_busy *b = &s->busy[0];

		if (!s->nbusy) {
			say(a, "busy %s %s code busy: a CPU's stopper thread is inside it (after %d tries)\n",
			    op, u->id, tries);
		} else {
			if (undo)
				say(a, "busy %s %s code busy: %ps in use by %s[%d] (after %d tries)", op,
				    u->id, (void *)b->addr, b->comm, b->pid, tries);
			else
				say(a, "busy %s %s code busy: %s in use by %s[%d] (after %d tries)", op,
				    u->id, u->funcs[b->func].name, b->comm, b->pid, tries);
			for (i = 0; i < s->nbusy; i++)
				say(a, "%s %s[%d] %s", i ? ";" : ":", s->busy[i].comm, s->busy[i].pid,
				    why_text[s->busy[i].why]);
			say(a, "\n");
		}
	} else if (ret == -EILSEQ) {
		say(a, "mismatch %s %s %s: the bytes at %pS are not the ones matched\n", op, u->id,
		    u->funcs[s->mismatch_func].name, (void *)u->funcs[s->mismatch_func].site);
	} else {
		say(a, "error %s %s stop_machine: %d\n", op, u->id, ret);
	}
	release_busy(s);
	kfree(s);
	return ret;
}

/* --- requests ------------------------------------------------------------------------------------- */

static void free_update(struct ls_update *u)
{
	if (!u)
		return;
	kvfree(u->funcs);
	kvfree(u->ranges);
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

static bool valid_token(const char *s, size_t max)
{
	size_t n = strnlen(s, max);

	if (!n || n >= max)
		return false;
	for (; *s; s++)
		if (*s <= ' ' || *s > '~')
			return false;
	return true;
}

static bool valid_id(const char *id)
{
	const char *p;

	if (!valid_token(id, ID_LEN))
		return false;
	for (p = id; *p; p++)
		if (!isalnum(*p) && *p != '-' && *p != '_')
			return false;
	return true;
}

/* Code of the running kernel (vmlinux or a module), all of [start, end): ranges are only
 * compared with, never written. */
static bool kernel_code(unsigned long start, unsigned long end)
{
	return start < end && end - start <= MAX_RANGE_SIZE && kernel_text_address(start) &&
	       kernel_text_address(end - 1);
}

static struct module *text_module(unsigned long addr)
{
	struct module *m;

	preempt_disable();
	m = __module_text_address(addr);
	preempt_enable();
	return m;
}

static int parse_hex(const char *hex, u8 *out, int n)
{
	return strlen(hex) == 2 * n ? hex2bin(out, hex, n) : -EINVAL;
}

/* Is anything of this request in the way of its jumps? Say what, and return -EINVAL if so. */
static int check_funcs(struct ls_update *u, struct ls_answer *a)
{
	struct ls_update *other;
	int i, j;

	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];
		void *site = (void *)f->site, *last = site + JMP_SIZE - 1;

		/* vmlinux's own code (not init text, not a module, a BPF image or a trampoline that
		 * can go away under the jump); what the kernel would not let a kprobe write either
		 * (the int3 path, noinstr and entry code) is refused. */
		if (!core_kernel_text(f->site) || !core_kernel_text(f->site + JMP_SIZE - 1)) {
			say(a, "error apply %s bad site %lx of %s: not vmlinux code\n", u->id,
			    f->site, f->name);
			return -EINVAL;
		}
		if (within_kprobe_blacklist(f->site) || ftrace_text_reserved(site, last)) {
			say(a, "refused apply %s %s: %pS is code the kernel lets no probe write (its int3 or entry path, noinstr code, or an ftrace site)\n",
			    u->id, f->name, site);
			return -EPERM;
		}
		if (text_module(f->target) != u->mod || text_module(f->target + JMP_SIZE - 1) != u->mod) {
			say(a, "error apply %s bad target %lx of %s: not in module %s\n", u->id, f->target,
			    f->name, u->mod->name);
			return -EINVAL;
		}
		if (jump_label_text_reserved(site, last) || static_call_text_reserved(site, last)) {
			say(a, "refused apply %s %s: the jump at %pS would cover a jump label or static call site, which the kernel rewrites at run time\n",
			    u->id, f->name, site);
			return -EPERM;
		}
		for (j = 0; j < i; j++) {
			if (f->site < u->funcs[j].site + JMP_SIZE && u->funcs[j].site < f->site + JMP_SIZE) {
				say(a, "error apply %s sites of %s and %s overlap\n", u->id, f->name,
				    u->funcs[j].name);
				return -EINVAL;
			}
		}
		make_jump(f->jump, f->site, f->target);
	}
	for (i = 0; i < u->nranges; i++) {
		if (!kernel_code(u->ranges[i].start, u->ranges[i].end)) {
			say(a, "error apply %s bad range %lx-%lx: not code of the running kernel\n", u->id,
			    u->ranges[i].start, u->ranges[i].end);
			return -EINVAL;
		}
	}
	/* A site another update already redirects can only be stacked on: then the expected
	 * bytes are that update's jump, which the byte check under stop_machine confirms. */
	list_for_each_entry(other, &updates, list) {
		for (i = 0; i < u->nfuncs; i++)
			for (j = 0; j < other->nfuncs; j++)
				if (u->funcs[i].site != other->funcs[j].site &&
				    u->funcs[i].site < other->funcs[j].site + JMP_SIZE &&
				    other->funcs[j].site < u->funcs[i].site + JMP_SIZE) {
					say(a, "error apply %s site of %s overlaps update %s's jump in %s\n",
					    u->id, u->funcs[i].name, other->id, other->funcs[j].name);
					return -EINVAL;
				}
	}
	return 0;
}

/*
 * apply ID MODULE TRIES DELAY_MS
 * f NAME SITE TARGET EXPECT_HEX      one per function
 * r START END FUNC_INDEX             old code to find no thread in
 */
static int handle_apply(char *req, struct ls_answer *a)
{
	struct ls_update *u;
	char *line;
	char modname[MODULE_NAME_LEN], hex[2 * JMP_SIZE + 2];
	int tries, delay, ret = -EINVAL;
	struct module *mod;

	line = strsep(&req, "\n");
	u = kzalloc(sizeof(*u), GFP_KERNEL);
	if (!u)
		goto nomem;
	u->funcs = kvcalloc(MAX_FUNCS, sizeof(*u->funcs), GFP_KERNEL);
	u->ranges = kvcalloc(MAX_RANGES, sizeof(*u->ranges), GFP_KERNEL);
	if (!u->funcs || !u->ranges)
		goto nomem;
	if (sscanf(line, "apply %47s %55s %d %d", u->id, modname, &tries, &delay) != 4 ||
	    !valid_id(u->id) || !valid_token(modname, MODULE_NAME_LEN) || tries < 1 || tries > 1000 ||
	    delay < 0 || delay > 60000 || (u64)tries * delay > MAX_WAIT_MS) {
		say(a, "error apply - bad apply line\n");
		goto out;
	}
	while ((line = strsep(&req, "\n")) != NULL) {
		struct ls_func *f;
		struct ls_range *r;
		unsigned long x, y;
		int idx;

		if (!*line)
			continue;
		if (line[0] == 'f' && u->nfuncs < MAX_FUNCS) {
			f = &u->funcs[u->nfuncs];
			if (sscanf(line, "f %511s %lx %lx %11s", f->name, &f->site, &f->target, hex) != 4 ||
			    !valid_token(f->name, KSYM_NAME_LEN) || parse_hex(hex, f->expect, JMP_SIZE))
				goto bad_line;
			u->nfuncs++;
		} else if (line[0] == 'r' && u->nranges < MAX_RANGES &&
			   sscanf(line, "r %lx %lx %d", &x, &y, &idx) == 3 && idx >= 0 &&
			   idx < u->nfuncs) {
			r = &u->ranges[u->nranges++];
			r->start = x;
			r->end = y;
			r->func = idx;
		} else {
			goto bad_line;
		}
	}
	if (!u->nfuncs) {
		say(a, "error apply %s no functions\n", u->id);
		goto out;
	}
	if (find_update(u->id)) {
		say(a, "error apply %s an update with this id is applied\n", u->id);
		goto out;
	}
	/* The new code's module, pinned while the update is applied. */
	preempt_disable();
	mod = find_module(modname);
	if (mod && (mod->state != MODULE_STATE_LIVE || !try_module_get(mod)))
		mod = NULL;
	preempt_enable();
	if (!mod) {
		say(a, "error apply %s module %s is not loaded\n", u->id, modname);
		goto out;
	}
	u->mod = mod;
	ret = check_funcs(u, a);
	if (!ret)
		ret = switch_update(u, false, tries, delay, a);
	if (ret) {
		module_put(mod);
		goto out;
	}
	__module_get(THIS_MODULE);
	add_taint(TAINT_LIVEPATCH, LOCKDEP_STILL_OK);
	pr_info("livesplice: applied %s (%s): %d functions, machine stopped %llu us\n", u->id,
		mod->name, u->nfuncs, div_u64(u->pause_ns, 1000));
	list_add_tail(&u->list, &updates);
	u = NULL;
out:
	free_update(u);
	return ret;
bad_line:
	say(a, "error apply %s bad line: %.200s\n", u->id[0] ? u->id : "-", line);
	goto out;
nomem:
	say(a, "error apply - out of memory\n");
	ret = -ENOMEM;
	goto out;
}

static int handle_undo(char *req, struct ls_answer *a)
{
	char id[ID_LEN];
	int tries, delay, i, j, ret;
	struct ls_update *u, *later;

	if (sscanf(req, "undo %47s %d %d", id, &tries, &delay) != 3 || !valid_id(id) ||
	    tries < 1 || tries > 1000 || delay < 0 || delay > 60000 ||
	    (u64)tries * delay > MAX_WAIT_MS) {
		say(a, "error undo - bad undo line\n");
		return -EINVAL;
	}
	u = find_update(id);
	if (!u) {
		say(a, "unknown undo %s no applied update %s\n", id, id);
		return -ENOENT;
	}
	/* A later update that patched one of the same sites stacks on this one. */
	later = u;
	list_for_each_entry_continue(later, &updates, list) {
		for (i = 0; i < u->nfuncs; i++)
			for (j = 0; j < later->nfuncs; j++)
				if (u->funcs[i].site == later->funcs[j].site) {
					say(a, "stacked undo %s update %s stacks on %s (%s): undo it first\n",
					    id, later->id, u->id, u->funcs[i].name);
					return -EBUSY;
				}
	}
	ret = switch_update(u, true, tries, delay, a);
	if (ret)
		return ret;
	list_del(&u->list);
	pr_info("livesplice: undone %s (%s), machine stopped %llu us\n", u->id, u->mod->name,
		div_u64(u->pause_ns, 1000));
	/* No jump leads into the update any more and no thread is in it; callbacks it queued with
	 * call_rcu() may still be pending: wait for them before its code can go. */
	rcu_barrier();
	/* And for any task still between instructions of it that no stack showed (an exiting
	 * thread past release_task()): a tasks-RCU grace period. */
	synchronize_rcu_tasks();
	module_put(u->mod);
	free_update(u);
	module_put(THIS_MODULE);
	return 0;
}

static notrace int do_nothing(void *unused)
{
	return 0;
}

/* bench N: the pause of N empty stop_machine() calls, to set an update's pause against. */
static int handle_bench(char *req, struct ls_answer *a)
{
	int n, i;
	u64 t0, pause, best = U64_MAX, total = 0;

	if (sscanf(req, "bench %d", &n) != 1 || n < 1 || n > 1000) {
		say(a, "error bench - bad bench line\n");
		return -EINVAL;
	}
	for (i = 0; i < n; i++) {
		t0 = ktime_get_ns();
		stop_machine(do_nothing, NULL, NULL);
		pause = ktime_get_ns() - t0;
		total += pause;
		best = min(best, pause);
	}
	say(a, "ok bench - mean_ns=%llu min_ns=%llu n=%d\n", div_u64(total, n), best, n);
	return 0;
}

/* state: the applied updates, oldest first. */
static int handle_state(struct ls_answer *a)
{
	struct ls_update *u;
	int i;

	say(a, "ok state - protocol=%d\n", LIVESPLICE_PROTOCOL);
	list_for_each_entry(u, &updates, list) {
		say(a, "update %s %s %d pause_ns=%llu work_ns=%llu attempts=%d\n", u->id,
		    u->mod->name, u->nfuncs, u->pause_ns, u->work_ns, u->attempts);
		for (i = 0; i < u->nfuncs; i++)
			say(a, "func %s %s %lx %lx %*phN\n", u->id, u->funcs[i].name, u->funcs[i].site,
			    u->funcs[i].target, JMP_SIZE, u->funcs[i].saved);
	}
	return 0;
}

/* --- the device ---------------------------------------------------------------------------------- */

static int ls_open(struct inode *inode, struct file *file)
{
	struct ls_answer *a = kzalloc(sizeof(*a), GFP_KERNEL);

	if (!a)
		return -ENOMEM;
	file->private_data = a;
	return 0;
}

static int ls_release(struct inode *inode, struct file *file)
{
	struct ls_answer *a = file->private_data;

	kvfree(a->buf);
	kfree(a);
	return 0;
}

static ssize_t ls_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	struct ls_answer *a = file->private_data;
	char *req;
	size_t cap;

	if (len > MAX_REQUEST)
		return -E2BIG;
	req = kvmalloc(len + 1, GFP_KERNEL);
	if (!req)
		return -ENOMEM;
	if (copy_from_user(req, buf, len)) {
		kvfree(req);
		return -EFAULT;
	}
	req[len] = '\0';
	if (memchr(req, '\0', len)) {
		kvfree(req);
		return -EINVAL;
	}
	if (mutex_lock_killable(&ls_mutex)) {
		kvfree(req);
		return -EINTR;
	}
	if (a->buf) {			/* one request per open file */
		mutex_unlock(&ls_mutex);
		kvfree(req);
		return -EBUSY;
	}
	/* Enough for the state of every applied update. */
	cap = 4096;
	if (!strncmp(req, "state", 5)) {
		struct ls_update *u;

		list_for_each_entry(u, &updates, list)
			cap += 256 + u->nfuncs * (KSYM_NAME_LEN + 128);
	}
	a->buf = kvzalloc(cap, GFP_KERNEL);
	a->cap = cap;
	a->len = 0;
	if (!a->buf) {
		mutex_unlock(&ls_mutex);
		kvfree(req);
		return -ENOMEM;
	}
	if (!strncmp(req, "apply ", 6))
		handle_apply(req, a);
	else if (!strncmp(req, "undo ", 5))
		handle_undo(req, a);
	else if (!strncmp(req, "bench ", 6))
		handle_bench(req, a);
	else if (!strcmp(req, "state\n") || !strcmp(req, "state"))
		handle_state(a);
	else
		say(a, "error - - unknown request\n");
	mutex_unlock(&ls_mutex);
	kvfree(req);
	return len;
}

static ssize_t ls_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	struct ls_answer *a = file->private_data;
	ssize_t ret;

	mutex_lock(&ls_mutex);
	ret = a->buf ? simple_read_from_buffer(buf, len, ppos, a->buf, a->len) : -ENODATA;
	mutex_unlock(&ls_mutex);
	return ret;
}

static const struct file_operations ls_fops = {
	.owner = THIS_MODULE,
	.open = ls_open,
	.release = ls_release,
	.write = ls_write,
	.read = ls_read,
	.llseek = noop_llseek,
};

static struct miscdevice ls_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "livesplice",
	.fops = &ls_fops,
	.mode = 0600,
};

static int __init livesplice_core_init(void)
{
	int ret = register_die_notifier(&ls_int3_nb);

	if (ret)
		return ret;
	ret = misc_register(&ls_dev);
	if (ret)
		unregister_die_notifier(&ls_int3_nb);
	return ret;
}

static void __exit livesplice_core_exit(void)
{
	misc_deregister(&ls_dev);
	unregister_die_notifier(&ls_int3_nb);
	/* A parked task may still be returning from ls_park_fn(). */
	synchronize_rcu_tasks();
}

module_init(livesplice_core_init);
module_exit(livesplice_core_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("livesplice core: switches kernel functions under stop_machine");
MODULE_INFO(livesplice_protocol, __stringify(LIVESPLICE_PROTOCOL));
