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
 * Module targets (protocol 3) are described to it declaratively instead: it resolves their
 * symbols in the module's own symbol table, checks their code and writes their jumps itself, at
 * apply for a loaded module and from its module notifier whenever the module loads, with no
 * user space then.
 *
 * Interface: the character device /dev/livesplice. Each open file carries one request and its
 * answer: write the whole request in one write(), then read the answer. The grammar is in
 * docs/core-protocol.md (LIVESPLICE_PROTOCOL below is its version); livesplice/coreproto.py is
 * the user-space side.
 *
 * Kernel functions that are not exported (text_poke_kgdb, find_module, ...) are called directly:
 * `apply` turns their undefined symbols into absolute ones at their /proc/kallsyms addresses
 * before loading this module. Nothing is called through a pointer to an unexported function
 * (with IBT, a sealed ENDBR makes such a call fault). The only indirect calls are to the patch
 * author's hooks: functions of an update's module at a symbol's start, with an ENDBR when the
 * CPU enforces IBT (hooks_in_module checks both).
 */

#include <linux/module.h>
#include <linux/version.h>
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
#include <linux/hashtable.h>
#include <linux/gfp.h>
#include <asm/sync_core.h>
#include <asm/text-patching.h>
#include <asm/unwind.h>
#include <asm/ibt.h>
#include <asm/sections.h>

#include "livesplice.h"		/* what it exports to patches (copied beside this file) */

#define LIVESPLICE_PROTOCOL 3
/* What this core has of its protocol, in `state`: shadow = livesplice.h's exports; hooks = k
 * lines (the patch author's hooks). */
#define LIVESPLICE_FEATURES "shadow,hooks,rewrite"
#define JMP_SIZE 5
#define INT3 0xcc
#define MAX_FUNCS 4096			/* f and p lines of one request together; q lines */
#define MAX_RANGES 16384		/* r lines */
#define MAX_TARGETS 64			/* t lines */
#define MAX_FIELDS 131072		/* c and h lines together */
#define MAX_MASKS 131072		/* m lines */
#define MAX_HOOKS 256			/* k lines */
#define MAX_WRITES 4096			/* w lines */
#define MAX_WRITE_SIZE 4096		/* LEN of a w line */
#define MAX_CODE_SIZE (1 << 20)		/* SIZE of a p line */
#define MAX_B_BYTES 256			/* bytes of one b line */
#define MAX_SYMPOS 65535
#define BUILD_ID_HEX 129		/* up to 64 bytes in hex, and the NUL */
#define MAX_REQUEST (4 << 20)
#define ID_LEN 48
#define MAX_BUSY 8
#define MAX_RANGE_SIZE (1 << 20)
#define MAX_WAIT_MS (10 * 60 * 1000)	/* tries x delay: the lock is held meanwhile */
#define FORCED_TRIES 50			/* switching back an update whose module goes by force */
#define FORCED_DELAY_MS 20
/* A request's memory: charged to the writer's memory cgroup; a failure is an answer, not a
 * warning in the kernel log. */
#define LS_GFP (GFP_KERNEL_ACCOUNT | __GFP_NOWARN)

/* A relocated field: a c line (where: offset in its function) or an h line (where: address in
 * the new code). It holds NAME + ADDEND, minus its own address when PC-relative. */
struct ls_field {
	unsigned long where;
	char *name;
	unsigned int sympos;		/* 0: anywhere in the kernel; n: the target's n-th NAME */
	unsigned int type;		/* R_X86_64_* */
	s64 addend;
	u64 value;			/* h: what is written, once resolved */
};

struct ls_mask {
	unsigned int offset, length;
};

/* A module name the notifier must not let pass without ls_mutex: on the `named` list. */
struct ls_name {
	struct list_head list;
	const char *name;
};

/* A split-off part of a module function (its .cold code: a q line), resolved with it. */
struct ls_part {
	char *name;
	unsigned int sympos, size;
	unsigned long addr;		/* resolved; 0 while the target waits */
};

struct ls_func {
	char name[KSYM_NAME_LEN];
	unsigned long site;		/* where the jump goes: old function + fentry size; 0 while
					 * a module target waits */
	unsigned long target;		/* the new function */
	u8 expect[JMP_SIZE];		/* the bytes matched at site */
	u8 saved[JMP_SIZE];		/* what the site held before this update */
	u8 jump[JMP_SIZE];		/* jmp target */
	/* A module target's function (p line); tgt is -1 for vmlinux's (f line). */
	int tgt;
	unsigned int sympos, size, fentry;
	u8 *code;			/* the pre code, size bytes */
	unsigned long *cmp;		/* bitmap: the bytes compared (given, not masked, not a c field) */
	struct ls_mask *masks;
	struct ls_field *checks;
	struct ls_part *parts;
	int nmasks, nchecks, nparts;
	unsigned long addr, live;	/* resolved: the function; where its code runs now */
};

/*
 * The patch author's hooks (livesplice.h): k lines, each a function of the update's module, run
 * in the order given (the source order). tgt is the target whose patching runs it: -1 for
 * vmlinux (the whole apply or undo), else a module target (when that module is patched, at apply
 * or at its load, and when it is switched back).
 */
enum ls_hook_kind {
	LS_PRE_APPLY, LS_CHECK_APPLY, LS_APPLY, LS_POST_APPLY, LS_FAIL_APPLY,
	LS_PRE_REVERSE, LS_CHECK_REVERSE, LS_REVERSE, LS_POST_REVERSE, LS_FAIL_REVERSE,
	LS_NHOOK_KINDS
};

static const char *const hook_kinds[LS_NHOOK_KINDS] = {
	"pre_apply", "check_apply", "apply", "post_apply", "fail_apply",
	"pre_reverse", "check_reverse", "reverse", "post_reverse", "fail_reverse",
};

/* The kinds whose hooks return int (non-zero: abort); the others return nothing. */
static inline notrace bool hook_returns(int kind)
{
	return kind == LS_PRE_APPLY || kind == LS_CHECK_APPLY || kind == LS_PRE_REVERSE ||
	       kind == LS_CHECK_REVERSE;
}

struct ls_hook {
	int kind, tgt;
	unsigned long fn;
};

/* Which hooks a run takes: those of the whole update (vmlinux's, and of the module targets in
 * the switch), of one target (its index), or none. */
#define SCOPE_ALL -2
#define SCOPE_NONE -3

struct ls_target {
	char name[MODULE_NAME_LEN];
	char build_id[BUILD_ID_HEX];	/* "-": none given */
	struct module *mod;		/* while patched: the instance its jumps are in */
	bool patched;
	bool pending;			/* checked at this load, to be written */
	bool pre_ran;			/* at its load: its PRE_APPLY hooks ran, POST or FAIL not yet */
	int first, nfuncs;		/* its functions: funcs[first .. first + nfuncs) */
	struct ls_field *held;
	int nheld;
	struct ls_name named;		/* name = this target's name */
};

struct ls_range {
	unsigned long start, end;	/* [start, end): code no thread may be in */
	int func;			/* index into funcs, for the message */
};

/*
 * Read-only data of vmlinux rewritten in place (a w line): the len bytes at addr, within the
 * object `name` in [__start_rodata, __end_rodata) (const and __ro_after_init data), take the
 * bytes at source, the update module's copy of the object as its loader relocated it. Written
 * in the switch through `alias`, a writable mapping of the same pages made for the switch; the
 * kernel's own mapping stays read-only.
 */
struct ls_write {
	char name[KSYM_NAME_LEN];
	unsigned long addr, source;
	unsigned int len;
	u8 *old;			/* what run-pre matching found there: restored by undo */
	u8 *new;			/* the module's bytes, copied when checked */
	void *map;			/* the vmap()ed pages while switching, NULL otherwise */
	u8 *alias;			/* addr in map */
};

struct ls_update {
	struct list_head list;
	char id[ID_LEN];
	char modname[MODULE_NAME_LEN];	/* the new code's module */
	struct ls_name named;		/* name = modname */
	bool published;			/* its names are on the `named` list */
	struct module *mod;		/* the new code, pinned while applied */
	int nfuncs, nranges;		/* nfuncs: all; vmlinux's (f lines) first */
	int nvmlinux, ntargets, nchecks, nheld, nmasks, nparts, maxranges;
	struct ls_func *funcs;
	struct ls_range *ranges;	/* the old code, checked on apply */
	struct ls_target *targets;
	struct ls_field *checks, *held;
	struct ls_mask *masks;
	struct ls_part *parts;
	struct ls_hook *hooks;
	int nhooks;
	struct ls_write *writes;	/* vmlinux's, so switched with SCOPE_ALL and SCOPE_NONE */
	int nwrites;
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

/* --- hooks ------------------------------------------------------------------------------------ */

static notrace bool hook_in_scope(struct ls_update *u, struct ls_hook *h, int scope, bool undo)
{
	if (scope == SCOPE_NONE)
		return false;
	if (scope != SCOPE_ALL)
		return h->tgt == scope;
	if (h->tgt < 0)
		return true;
	/* a module target takes part in an apply when it is loaded (pending), in an undo when
	 * it is patched; a waiting one runs its hooks when it loads */
	return undo ? u->targets[h->tgt].patched : u->targets[h->tgt].pending;
}

/*
 * Run u's hooks of `kind` in scope, in order. Hooks that return int stop at the first non-zero
 * (its index in *failed); the others all run. Called inside stop_machine for the CHECK, APPLY
 * and REVERSE kinds (interrupts off: the hooks must not sleep), in process context otherwise.
 */
static notrace int run_hooks(struct ls_update *u, int kind, int scope, bool undo, int *failed)
{
	int i, ret;

	for (i = 0; i < u->nhooks; i++) {
		struct ls_hook *h = &u->hooks[i];

		if (h->kind != kind || !hook_in_scope(u, h, scope, undo))
			continue;
		if (!hook_returns(kind)) {
			((void (*)(void))h->fn)();
			continue;
		}
		ret = ((int (*)(void))h->fn)();
		if (ret) {
			if (failed)
				*failed = i;
			return ret;
		}
	}
	return 0;
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
	int scope;			/* the hooks this switch runs (SCOPE_*, or a target) */
	int hook_failed, hook_ret;	/* a CHECK hook that said no, and what it returned */
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
	int mismatch_write;
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
		 * would resume in the middle of the jump. (Site 0: a waiting module target.) */
		if (u->funcs[i].site && addr > u->funcs[i].site &&
		    addr < u->funcs[i].site + JMP_SIZE) {
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
		if (u->funcs[i].site)
			text_poke_kgdb((void *)u->funcs[i].site, &int3, 1);
	sync_others(s);
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (f->site)
			text_poke_kgdb((void *)f->site + 1, (s->undo ? f->saved : f->jump) + 1,
				       JMP_SIZE - 1);
	}
	sync_others(s);
	for (i = 0; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (f->site)
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
		if (s->u->funcs[i].site && s->u->funcs[i].site == ip) {
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

/* Data is vmlinux's: written when the whole update switches (not one module target's switch). */
static inline notrace bool writes_in_scope(struct ls_switch *s)
{
	return s->scope == SCOPE_ALL || s->scope == SCOPE_NONE;
}

/*
 * Every other CPU is stopped with interrupts off; only an NMI handler could read the data
 * meanwhile, so aligned words are stored whole (a pointer is never seen half-written).
 */
static notrace void write_data(struct ls_write *w, bool undo)
{
	const u8 *from = undo ? w->old : w->new;
	unsigned int i = 0;
	u64 word;

	for (; i < w->len && !IS_ALIGNED(w->addr + i, sizeof(u64)); i++)
		WRITE_ONCE(w->alias[i], from[i]);
	for (; i + sizeof(u64) <= w->len; i += sizeof(u64)) {
		memcpy(&word, from + i, sizeof(word));
		WRITE_ONCE(*(u64 *)(w->alias + i), word);
	}
	for (; i < w->len; i++)
		WRITE_ONCE(w->alias[i], from[i]);
}

/* The writable aliases of the pages of u's writes, for one try of a switch: made just before
 * the machine is stopped (vmap may sleep), removed right after it runs again. The pages are
 * the kernel image's (reserved); the kernel's own mapping of them stays read-only. */
static int map_writes(struct ls_update *u)
{
	int i;

	for (i = 0; i < u->nwrites; i++) {
		struct ls_write *w = &u->writes[i];
		unsigned long first = w->addr & PAGE_MASK, last = (w->addr + w->len - 1) & PAGE_MASK;
		struct page *pages[2];
		int n = 1;

		pages[0] = virt_to_page((void *)first);
		if (last != first)
			pages[n++] = virt_to_page((void *)last);
		if (!PageReserved(pages[0]) || !PageReserved(pages[n - 1]))
			return -EFAULT;
		w->map = vmap(pages, n, VM_MAP, PAGE_KERNEL);
		if (!w->map)
			return -ENOMEM;
		w->alias = w->map + offset_in_page(w->addr);
	}
	return 0;
}

static void unmap_writes(struct ls_update *u)
{
	bool mapped = false;
	int i;

	for (i = 0; i < u->nwrites; i++) {
		if (u->writes[i].map) {
			vunmap(u->writes[i].map);
			mapped = true;
		}
		u->writes[i].map = NULL;
		u->writes[i].alias = NULL;
	}
	if (mapped)
		vm_unmap_aliases();	/* no CPU keeps a writable TLB entry of them */
}

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

		if (f->site && memcmp((void *)f->site, s->undo ? f->jump : f->expect, JMP_SIZE)) {
			s->mismatch_func = i;
			return -EILSEQ;
		}
	}
	for (i = 0; writes_in_scope(s) && i < u->nwrites; i++) {
		struct ls_write *w = &u->writes[i];

		if (memcmp((void *)w->addr, s->undo ? w->new : w->old, w->len)) {
			s->mismatch_write = i;
			return -EILSEQ;
		}
	}
	s->hook_ret = run_hooks(u, s->undo ? LS_CHECK_REVERSE : LS_CHECK_APPLY, s->scope, s->undo,
				&s->hook_failed);
	if (s->hook_ret)
		return -ECANCELED;
	if (!s->undo)
		for (i = 0; i < u->nfuncs; i++)
			if (u->funcs[i].site)
				memcpy(u->funcs[i].saved, (void *)u->funcs[i].site, JMP_SIZE);
	write_sites(s);
	for (i = 0; writes_in_scope(s) && i < u->nwrites; i++)
		write_data(&u->writes[i], s->undo);
	run_hooks(u, s->undo ? LS_REVERSE : LS_APPLY, s->scope, s->undo, NULL);
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
static int switch_update(struct ls_update *u, bool undo, int tries, int delay_ms, int scope,
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
		s->scope = scope;
		s->hook_failed = -1;
		s->mismatch_func = -1;
		s->mismatch_write = -1;
		if (scope == SCOPE_ALL || scope == SCOPE_NONE) {
			ret = map_writes(u);
			if (ret) {	/* memory is short: tried again, as a busy try is */
				unmap_writes(u);
				if (ret == -EFAULT)
					break;
				if (attempt < tries)
					msleep(delay_ms);
				continue;
			}
		}
		cpus_read_lock();
		mutex_lock(&text_mutex);
		t0 = ktime_get_ns();
		ret = stop_machine_cpuslocked(ls_stopped, s, cpu_online_mask);
		u->pause_ns = ktime_get_ns() - t0;
		mutex_unlock(&text_mutex);
		cpus_read_unlock();
		unmap_writes(u);
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
	} else if (ret == -ECANCELED && s->hook_failed >= 0) {
		struct ls_hook *h = &u->hooks[s->hook_failed];

		say(a, "refused %s %s %s hook %ps returned %d: nothing was changed\n", op, u->id,
		    hook_kinds[h->kind], (void *)h->fn, s->hook_ret);
	} else if (ret == -ENOMEM || ret == -EFAULT) {
		say(a, "error %s %s the data's writable mapping: %s\n", op, u->id,
		    ret == -EFAULT ? "not pages of the kernel image" : "out of memory");
	} else if (ret == -EILSEQ && s->mismatch_write >= 0) {
		struct ls_write *w = &u->writes[s->mismatch_write];

		say(a, "mismatch %s %s %s: the %u bytes at %pS are not the ones %s\n", op, u->id,
		    w->name, w->len, (void *)w->addr, undo ? "this update wrote" : "matched");
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

/* Not in the kernel's public headers (kernel/module/internal.h); apply links it as it links the
 * unexported functions. */
extern struct mutex module_mutex;

static void withdraw_names(struct ls_update *u);

static void free_update(struct ls_update *u)
{
	int i;

	if (!u)
		return;
	withdraw_names(u);
	for (i = 0; u->funcs && i < u->nfuncs; i++) {
		kvfree(u->funcs[i].code);
		kvfree(u->funcs[i].cmp);
	}
	for (i = 0; u->checks && i < u->nchecks; i++)
		kfree(u->checks[i].name);
	for (i = 0; u->held && i < u->nheld; i++)
		kfree(u->held[i].name);
	for (i = 0; u->parts && i < u->nparts; i++)
		kfree(u->parts[i].name);
	for (i = 0; u->writes && i < u->nwrites; i++) {
		kfree(u->writes[i].old);
		kfree(u->writes[i].new);
	}
	kvfree(u->writes);
	kvfree(u->funcs);
	kvfree(u->ranges);
	kvfree(u->targets);
	kvfree(u->checks);
	kvfree(u->held);
	kvfree(u->masks);
	kvfree(u->parts);
	kvfree(u->hooks);
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

/* "-", or 1 to 64 bytes in hex. */
static bool valid_build_id(const char *s)
{
	size_t n = strnlen(s, BUILD_ID_HEX);

	if (!strcmp(s, "-"))
		return true;
	if (n < 2 || n >= BUILD_ID_HEX || n % 2)
		return false;
	for (; *s; s++)
		if (!isxdigit(*s))
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

/* [start, start + size) lies in mod's core (not init) text. */
static bool in_core_text(struct module *mod, unsigned long start, unsigned long size)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	unsigned long base = (unsigned long)mod->mem[MOD_TEXT].base;
	unsigned long text_size = mod->mem[MOD_TEXT].size;
#else
	unsigned long base = (unsigned long)mod->core_layout.base;
	unsigned long text_size = mod->core_layout.text_size;
#endif

	return start >= base && size <= text_size && start - base <= text_size - size;
}

/* [start, start + size) lies in mod's read-only data (after init: .rodata and the like). */
static bool in_core_rodata(struct module *mod, unsigned long start, unsigned long size)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	unsigned long base = (unsigned long)mod->mem[MOD_RODATA].base;
	unsigned long len = mod->mem[MOD_RODATA].size;
#else
	unsigned long base = (unsigned long)mod->core_layout.base + mod->core_layout.text_size;
	unsigned long len = mod->core_layout.ro_size - mod->core_layout.text_size;
#endif

	return start >= base && size <= len && start - base <= len - size;
}

static int parse_hex(const char *hex, u8 *out, int n)
{
	return strlen(hex) == 2 * n ? hex2bin(out, hex, n) : -EINVAL;
}

/* Split a line at single spaces: the number of tokens, or -1 for more than max or an empty one. */
static int split_tokens(char *line, char **tok, int max)
{
	char *p;
	int n = 0;

	while ((p = strsep(&line, " ")) != NULL) {
		if (!*p || n == max)
			return -1;
		tok[n++] = p;
	}
	return n;
}

static bool parse_uint(const char *s, unsigned int max, unsigned int *out)
{
	return !kstrtouint(s, 10, out) && *out <= max;
}

/* The width of a field of this relocation type; 0 for a type the protocol does not take. */
static unsigned int field_width(unsigned int type)
{
	switch (type) {
	case R_X86_64_64:
	case R_X86_64_PC64:
		return 8;
	case R_X86_64_PC32:
	case R_X86_64_PLT32:
	case R_X86_64_32:
	case R_X86_64_32S:
		return 4;
	}
	return 0;
}

/* What a field of this type at `place` holds when it refers to sym + addend (the low bytes of
 * *value, little-endian); -ERANGE if the field cannot hold it. */
static int field_value(unsigned int type, unsigned long sym, s64 addend, unsigned long place,
		       u64 *value)
{
	u64 v = sym + addend;

	switch (type) {
	case R_X86_64_64:
		*value = v;
		return 0;
	case R_X86_64_PC64:
		*value = v - place;
		return 0;
	case R_X86_64_PC32:
	case R_X86_64_PLT32:
		v -= place;
		fallthrough;
	case R_X86_64_32S:
		if ((s64)v != (s32)v)
			return -ERANGE;
		*value = (u32)v;
		return 0;
	case R_X86_64_32:
		if (v != (u32)v)
			return -ERANGE;
		*value = v;
		return 0;
	}
	return -EINVAL;
}

/* A symbol the module keeps: in its core memory, or in its per-CPU area (a static
 * DEFINE_PER_CPU: its value is the per-CPU address, mod->percpu + its offset). */
static bool kept_symbol(struct module *mod, unsigned long value)
{
#ifdef CONFIG_SMP
	unsigned long percpu = (unsigned long)mod->percpu;

	if (mod->percpu_size && value >= percpu && value - percpu < mod->percpu_size)
		return true;
#endif
	return within_module_core(value, mod);
}

/*
 * The sympos-th symbol `name` of mod (1-based), in its symbol table's order, counting only
 * defined symbols the module keeps (kept_symbol): those of its .ko's allocated sections other
 * than .init*, .modinfo and __versions, as create counts them (stockmodule.py); the order of
 * /proc/kallsyms' lines for the module and of its .ko's symbol table, the same while its init
 * runs (the whole table) and after (the core symbols only). 0 if there is none.
 */
static unsigned long module_symbol(struct module *mod, const char *name, unsigned int sympos)
{
	struct mod_kallsyms *ks;
	unsigned long addr = 0;
	unsigned int i, seen = 0;

	preempt_disable();
	ks = rcu_dereference_sched(mod->kallsyms);
	for (i = 0; ks && i < ks->num_symtab; i++) {
		const Elf_Sym *sym = &ks->symtab[i];

		if (sym->st_shndx == SHN_UNDEF || !kept_symbol(mod, sym->st_value) ||
		    strcmp(ks->strtab + sym->st_name, name))
			continue;
		if (++seen == sympos) {
			addr = sym->st_value;
			break;
		}
	}
	preempt_enable();
	return addr;
}

/* SYMPOS 0: a symbol outside the target, by name in the whole kernel. */
static unsigned long resolve_symbol(struct module *mod, const char *name, unsigned int sympos)
{
	return sympos ? module_symbol(mod, name, sympos) : kallsyms_lookup_name(name);
}

/* Is anything of this request in the way of its vmlinux jumps? Say what, and return -EINVAL if so. */
static int check_funcs(struct ls_update *u, struct ls_answer *a)
{
	struct ls_update *other;
	int i, j;

	for (i = 0; i < u->nvmlinux; i++) {
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
		for (i = 0; i < u->nvmlinux; i++)
			for (j = 0; j < other->nfuncs; j++)
				if (other->funcs[j].site && u->funcs[i].site != other->funcs[j].site &&
				    u->funcs[i].site < other->funcs[j].site + JMP_SIZE &&
				    other->funcs[j].site < u->funcs[i].site + JMP_SIZE) {
					say(a, "error apply %s site of %s overlaps update %s's jump in %s\n",
					    u->id, u->funcs[i].name, other->id, other->funcs[j].name);
					return -EINVAL;
				}
	}
	return 0;
}

/* The module targets' new code and held fields are the update module's own. */
static int check_targets(struct ls_update *u, struct ls_answer *a)
{
	int i;

	for (i = u->nvmlinux; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (text_module(f->target) != u->mod || text_module(f->target + JMP_SIZE - 1) != u->mod) {
			say(a, "error apply %s bad target %lx of %s: not in module %s\n", u->id, f->target,
			    f->name, u->mod->name);
			return -EINVAL;
		}
	}
	for (i = 0; i < u->nheld; i++) {
		struct ls_field *h = &u->held[i];

		/* The whole field in the module's core (text or data, not init, which is freed). */
		if (!within_module_core(h->where, u->mod) ||
		    !within_module_core(h->where + field_width(h->type) - 1, u->mod)) {
			say(a, "error apply %s bad held field %lx: not in module %s\n", u->id, h->where,
			    u->mod->name);
			return -EINVAL;
		}
	}
	return 0;
}

/* --- module targets ---------------------------------------------------------------------------- */

static bool refuse_mismatch = true;
module_param(refuse_mismatch, bool, 0644);
MODULE_PARM_DESC(refuse_mismatch,
		 "refuse to load a module an update waits for whose code does not match (default); 0: let it load unpatched");

/*
 * The notifier's fast path. Every module's load and unload runs the core's notifier, but only a
 * module that an update targets, or that is an update's own module, needs ls_mutex, which an
 * apply or undo holds for seconds (tries x delay, rcu_barrier): other modprobes must not wait
 * for it. Under names_lock (nested inside module_mutex in target_to_patch):
 *
 * - `coming`: the modules whose MODULE_STATE_COMING the notifier has seen (recorded first,
 *   whatever the module), until they are live or gone. An apply patches such a module at once,
 *   as a live one: its init may be running, and once the notifier was called for it, a later
 *   failure of the load reaches the notifier as MODULE_STATE_GOING (the chain is robust). A
 *   module still coming otherwise is left to the notifier: patched at once, it could yet fail its
 *   load in a notifier before the core's and be freed with no MODULE_STATE_GOING to tell it.
 * - `named`: the targets' and the update module's names of every update in `updates`, and of
 *   the one being applied, published by handle_apply *before* it looks at the state of any of
 *   these modules, withdrawn when the update is freed (a failed apply, an undo).
 *
 * Why the notifier may skip ls_mutex for a module that is not named:
 * - COMING: the notifier records the module and reads `named` in one names_lock section; apply
 *   publishes in one, then reads the module's state (module_mutex) and `coming` (names_lock).
 *   If the notifier's section came first, the module is recorded, so apply patches it itself,
 *   and any later MODULE_STATE_GOING finds the name published and takes ls_mutex. If apply's
 *   came first, the notifier takes ls_mutex and so waits for the apply, which either patched
 *   the module (found recorded: the notifier then skips the patched target; should it refuse
 *   the load for another update, it forgets every target in this instance) or left it waiting
 *   (the notifier patches it).
 * - GOING: the loader writes MODULE_STATE_GOING (under module_mutex on rmmod, without it when
 *   a load fails), then calls the chain; the notifier reads `named` after a full barrier, and
 *   apply reads the state after publishing and a full barrier. So either apply sees the module
 *   going (it waits, nothing is written into it) or the notifier sees the name and takes
 *   ls_mutex, after the apply, and forgets what the apply wrote: the module's memory is freed
 *   only after its MODULE_STATE_GOING notifiers return.
 * - LIVE: `coming` forgets the module. One it never noted (its notifier chain ran before this core
 *   registered, or the record could not be allocated) an apply left waiting, and its LIVE is
 *   where it is patched (module_live_unseen): the loader writes MODULE_STATE_LIVE without
 *   module_mutex, so the same barriers as at GOING: either apply sees it live (and patches it
 *   itself) or the notifier sees the name and takes ls_mutex.
 */
static DEFINE_SPINLOCK(names_lock);
static LIST_HEAD(named);

struct ls_coming {
	struct list_head list;
	struct module *mod;
};

static LIST_HEAD(coming);

static bool is_named(const char *name)
{
	struct ls_name *n;
	bool found = false;

	spin_lock(&names_lock);
	list_for_each_entry(n, &named, list) {
		if (!strcmp(n->name, name)) {
			found = true;
			break;
		}
	}
	spin_unlock(&names_lock);
	return found;
}

/* Before handle_apply looks at the state of any of the update's modules. */
static void publish_names(struct ls_update *u)
{
	int i;

	spin_lock(&names_lock);
	u->named.name = u->modname;
	list_add(&u->named.list, &named);
	for (i = 0; i < u->ntargets; i++) {
		u->targets[i].named.name = u->targets[i].name;
		list_add(&u->targets[i].named.list, &named);
	}
	u->published = true;
	spin_unlock(&names_lock);
	/* Before the modules' states are read: pairs with the notifier's at MODULE_STATE_GOING. */
	smp_mb();
}

static void withdraw_names(struct ls_update *u)
{
	int i;

	if (!u->published)
		return;
	spin_lock(&names_lock);
	list_del(&u->named.list);
	for (i = 0; i < u->ntargets; i++)
		list_del(&u->targets[i].named.list);
	u->published = false;
	spin_unlock(&names_lock);
}

static bool seen_coming(struct module *mod)
{
	struct ls_coming *c;
	bool seen = false;

	spin_lock(&names_lock);
	list_for_each_entry(c, &coming, list) {
		if (c->mod == mod) {
			seen = true;
			break;
		}
	}
	spin_unlock(&names_lock);
	return seen;
}

/* Record mod as coming (c, if the allocation succeeded), and whether it is named. */
static bool note_coming(struct module *mod, struct ls_coming *c)
{
	struct ls_name *n;
	bool found = false;

	spin_lock(&names_lock);
	if (c) {	/* without it, an apply during its init leaves it to its next load */
		c->mod = mod;
		list_add(&c->list, &coming);
	}
	list_for_each_entry(n, &named, list) {
		if (!strcmp(n->name, mod->name)) {
			found = true;
			break;
		}
	}
	spin_unlock(&names_lock);
	return found;
}

/* Whether mod was noted at its MODULE_STATE_COMING. */
static bool forget_coming(struct module *mod)
{
	struct ls_coming *c, *tmp, *found = NULL;
	bool seen;

	spin_lock(&names_lock);
	list_for_each_entry_safe(c, tmp, &coming, list) {
		if (c->mod == mod) {
			list_del(&c->list);
			found = c;
			break;
		}
	}
	spin_unlock(&names_lock);
	seen = found;
	kfree(found);
	return seen;
}

static struct ls_target *find_target(struct ls_update *u, const char *name)
{
	int i;

	for (i = 0; i < u->ntargets; i++)
		if (!strcmp(u->targets[i].name, name))
			return &u->targets[i];
	return NULL;
}

/* The loaded instance of module `name` to patch now, or NULL: it waits (not loaded, unformed,
 * going, or coming with the notifier still to run). Under ls_mutex, with the name published,
 * which keeps the module's memory: it is freed only after the MODULE_STATE_GOING notifier,
 * which takes ls_mutex for a named module (see names_lock). */
static struct module *target_to_patch(const char *name)
{
	struct module *m;

	mutex_lock(&module_mutex);
	m = find_module(name);
	if (m && m->state != MODULE_STATE_LIVE && !(m->state == MODULE_STATE_COMING && seen_coming(m)))
		m = NULL;
	mutex_unlock(&module_mutex);
	return m;
}

/* A target's functions wait again: no site, nothing saved. */
static void forget_target(struct ls_update *u, struct ls_target *t)
{
	int i, j;

	for (i = t->first; i < t->first + t->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		f->site = 0;
		f->addr = 0;
		f->live = 0;
		memset(f->saved, 0, JMP_SIZE);
		for (j = 0; j < f->nparts; j++)
			f->parts[j].addr = 0;
	}
	t->patched = false;
	t->pending = false;
	t->mod = NULL;
}

/*
 * The function of an update older than u (all applied ones while u is not in the list) whose
 * jump is, or at this load is about to be, at `site`: the one u's function stacks on; *clash is
 * set to one whose jump overlaps the site without being at it.
 */
static struct ls_func *stacked_on(struct ls_update *u, unsigned long site, struct ls_update **owner,
				  struct ls_func **clash)
{
	struct ls_update *other;
	struct ls_func *found = NULL;
	int j;

	*clash = NULL;
	list_for_each_entry(other, &updates, list) {
		if (other == u)
			break;
		for (j = 0; j < other->nfuncs; j++) {
			struct ls_func *g = &other->funcs[j];

			if (!g->site)
				continue;
			if (g->site == site) {
				found = g;
				*owner = other;
			} else if (g->site < site + JMP_SIZE && site < g->site + JMP_SIZE) {
				*clash = g;
			}
		}
	}
	return found;
}

/*
 * The 5 bytes f's jump replaces, as its pre code has them, the c fields among them at their
 * values for mod. Masked bytes too: the core cannot tell the kernel's own rewrite of them from
 * a probe's int3 or jump, which it must never save and overwrite (the probe, disarmed, would
 * write its saved byte into the jump). 0, or -ENOENT if a field's symbol is not found.
 */
static int expected_site(struct ls_func *f, struct module *mod, u8 *want)
{
	bool fixed[JMP_SIZE];
	int j, k;

	memcpy(want, f->code + f->fentry, JMP_SIZE);
	/* Byte 0 is an instruction's start (after the fentry call), where a probe's int3 goes. */
	for (k = 0; k < JMP_SIZE; k++)
		fixed[k] = !k || test_bit(f->fentry + k, f->cmp);
	for (j = 0; j < f->nchecks; j++) {
		struct ls_field *c = &f->checks[j];
		unsigned int width = field_width(c->type);
		unsigned long sym;
		u64 value;

		if (c->where >= f->fentry + JMP_SIZE || c->where + width <= f->fentry)
			continue;
		sym = resolve_symbol(mod, c->name, c->sympos);
		if (!sym || field_value(c->type, sym, c->addend, f->live + c->where, &value))
			return -ENOENT;
		for (k = 0; k < width; k++)
			if (c->where + k >= f->fentry && c->where + k < f->fentry + JMP_SIZE) {
				want[c->where + k - f->fentry] = ((u8 *)&value)[k];
				fixed[c->where + k - f->fentry] = true;
			}
	}
	/* A masked byte inside an instruction (a string's or a section's address, not checked) is
	 * whatever the loader wrote: taken as it is, as no probe can start there. */
	for (k = 1; k < JMP_SIZE; k++)
		if (!fixed[k])
			want[k] = ((const u8 *)(f->addr + f->fentry))[k];
	return 0;
}

/*
 * Resolve target t of update u in its loaded module mod and check its code: each function's
 * bytes outside the masks and its relocated fields by value, where its code runs now (the new
 * code of an older update when one is at the site, as user space matches vmlinux); then the
 * values of the held fields. Sets each function's site, expected bytes and jump; writes
 * nothing. 0, or -EILSEQ (the code differs), -EPERM (a site is unsafe to write), -EINVAL, with
 * why; on failure the target is left waiting.
 */
static int resolve_target(struct ls_update *u, struct ls_target *t, struct module *mod, char *why,
			  size_t len)
{
	int i, j, ret;

	for (i = t->first; i < t->first + t->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i], *below, *clash;
		struct ls_update *owner = NULL;
		unsigned long site;
		void *last;
		const u8 *code;

		f->addr = module_symbol(mod, f->name, f->sympos);
		if (!f->addr) {
			snprintf(why, len, "%.128s (sympos %u) is not a symbol of %s", f->name,
				 f->sympos, t->name);
			ret = -EILSEQ;
			goto fail;
		}
		if (!in_core_text(mod, f->addr, f->size)) {
			snprintf(why, len, "%.128s (sympos %u) is not %u bytes of %s's code", f->name,
				 f->sympos, f->size, t->name);
			ret = -EILSEQ;
			goto fail;
		}
		for (j = 0; j < f->nparts; j++) {
			struct ls_part *part = &f->parts[j];

			part->addr = module_symbol(mod, part->name, part->sympos);
			if (!part->addr || !in_core_text(mod, part->addr, part->size)) {
				snprintf(why, len, "%.128s's part %.128s (sympos %u) is not %u bytes of %s's code",
					 f->name, part->name, part->sympos, part->size, t->name);
				ret = -EILSEQ;
				goto fail;
			}
		}
		site = f->addr + f->fentry;
		last = (void *)site + JMP_SIZE - 1;
		if (within_kprobe_blacklist(site) || ftrace_text_reserved((void *)site, last)) {
			snprintf(why, len, "%.128s: %pS is code the kernel lets no probe write", f->name,
				 (void *)site);
			ret = -EPERM;
			goto fail;
		}
		if (jump_label_text_reserved((void *)site, last) ||
		    static_call_text_reserved((void *)site, last)) {
			snprintf(why, len, "%.128s: the jump at %pS would cover a jump label or static call site",
				 f->name, (void *)site);
			ret = -EPERM;
			goto fail;
		}
		below = stacked_on(u, site, &owner, &clash);
		if (clash) {
			snprintf(why, len, "%.128s: the jump at %pS overlaps another update's jump in %.128s",
				 f->name, (void *)site, clash->name);
			ret = -EINVAL;
			goto fail;
		}
		if (below) {
			f->live = below->target;
			if (!in_core_text(owner->mod, f->live, f->size)) {
				snprintf(why, len, "%.128s does not match: update %s's code runs there",
					 f->name, owner->id);
				ret = -EILSEQ;
				goto fail;
			}
			memcpy(f->expect, below->jump, JMP_SIZE);
		} else {
			f->live = f->addr;
		}
		code = (const u8 *)f->live;
		for_each_set_bit(j, f->cmp, f->size) {
			if (code[j] != f->code[j]) {
				snprintf(why, len, "%.128s does not match: its byte at offset %#x differs",
					 f->name, j);
				ret = -EILSEQ;
				goto fail;
			}
		}
		for (j = 0; j < f->nchecks; j++) {
			struct ls_field *c = &f->checks[j];
			unsigned long place = f->live + c->where;
			unsigned long sym = resolve_symbol(mod, c->name, c->sympos);
			u64 want, have = 0;

			memcpy(&have, (void *)place, field_width(c->type));
			if (!sym || field_value(c->type, sym, c->addend, place, &want) || have != want) {
				snprintf(why, len, "%.128s does not match: its field at offset %#lx does not refer to %.128s%+lld (sympos %u)",
					 f->name, c->where, c->name, c->addend, c->sympos);
				ret = -EILSEQ;
				goto fail;
			}
		}
		/* What the jump replaces: the function's code, or the older update's jump, whatever
		 * the masks say. Its bytes outside the masks were compared above; a masked byte
		 * under the jump can only be taken for the pre code's. (An older update's jump at
		 * this same load is not written yet: module_coming checks it before the write.) */
		if (!below && expected_site(f, mod, f->expect)) {
			snprintf(why, len, "%.128s does not match: a field at its jump site (+%#x) does not resolve",
				 f->name, f->fentry);
			ret = -EILSEQ;
			goto fail;
		}
		if ((!below || below->tgt < 0 || owner->targets[below->tgt].patched) &&
		    memcmp((void *)site, f->expect, JMP_SIZE)) {
			snprintf(why, len, "%.128s: the bytes at its jump site (+%#x) are not its %s (%*phN, not %*phN): a probe, or code the kernel rewrote, which the jump must not cover",
				 f->name, f->fentry, below ? "older update's jump" : "code", JMP_SIZE,
				 (void *)site, JMP_SIZE, f->expect);
			ret = -EILSEQ;
			goto fail;
		}
		f->site = site;
		make_jump(f->jump, site, f->target);
	}
	for (i = t->first; i < t->first + t->nfuncs; i++) {
		for (j = t->first; j < i; j++) {
			if (u->funcs[i].site < u->funcs[j].site + JMP_SIZE &&
			    u->funcs[j].site < u->funcs[i].site + JMP_SIZE) {
				snprintf(why, len, "the jumps in %.128s and %.128s overlap",
					 u->funcs[i].name, u->funcs[j].name);
				ret = -EINVAL;
				goto fail;
			}
		}
	}
	for (i = 0; i < t->nheld; i++) {
		struct ls_field *h = &t->held[i];
		unsigned long sym = resolve_symbol(mod, h->name, h->sympos);

		if (!sym || field_value(h->type, sym, h->addend, h->where, &h->value)) {
			snprintf(why, len, "the new code's field at %#lx cannot refer to %.128s%+lld (sympos %u)",
				 h->where, h->name, h->addend, h->sympos);
			ret = -EILSEQ;
			goto fail;
		}
	}
	return 0;
fail:
	forget_target(u, t);
	return ret;
}

/* The held fields of the new code, once its target is resolved. Under text_mutex. */
static void write_held(struct ls_target *t)
{
	int i;

	for (i = 0; i < t->nheld; i++)
		text_poke((void *)t->held[i].where, &t->held[i].value, field_width(t->held[i].type));
}

static void ls_sync_core(void *unused)
{
	sync_core();
}

/* A refused load: every update forgets what it resolved, or wrote, in this instance of the
 * module, which the kernel frees with no MODULE_STATE_GOING for this notifier. */
static void forget_instance(struct module *mod)
{
	struct ls_update *u;
	struct ls_target *t;

	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (t && (t->pending || t->mod == mod))
			forget_target(u, t);
	}
}

/* At the end of a load's patching: POST_APPLY for each target of mod patched at it, FAIL_APPLY
 * for those whose PRE_APPLY ran and that were not (all of them when the load is refused). */
static void finish_coming_hooks(struct module *mod, bool refused)
{
	struct ls_update *u;
	struct ls_target *t;
	unsigned long flags;

	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || !t->pre_ran)
			continue;
		t->pre_ran = false;
		if (!(t->patched && t->mod == mod)) {
			run_hooks(u, LS_FAIL_APPLY, t - u->targets, false, NULL);
		} else if (!refused) {
			run_hooks(u, LS_POST_APPLY, t - u->targets, false, NULL);
		} else {
			/* written, its APPLY ran, and the load is refused after all (a probe raced
			 * a later update's write): switched back, as far as its hooks go */
			local_irq_save(flags);
			run_hooks(u, LS_REVERSE, t - u->targets, true, NULL);
			local_irq_restore(flags);
			run_hooks(u, LS_POST_REVERSE, t - u->targets, true, NULL);
		}
	}
}

/* The CHECK_APPLY hooks of every target of mod about to be patched, before any is written:
 * interrupts off as inside stop_machine (the other CPUs run: none of mod's code has yet). */
static int check_coming_hooks(struct module *mod, char *why, size_t len)
{
	struct ls_update *u;
	struct ls_target *t;
	unsigned long flags;
	int ret, failed = 0;

	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || !t->pending)
			continue;
		local_irq_save(flags);
		ret = run_hooks(u, LS_CHECK_APPLY, t - u->targets, false, &failed);
		local_irq_restore(flags);
		if (!ret)
			continue;
		snprintf(why, len, "update %s: check_apply hook %ps returned %d", u->id,
			 (void *)u->hooks[failed].fn, ret);
		if (refuse_mismatch)
			return ret;
		pr_warn("livesplice: %s loads unpatched by %s\n", mod->name, why);
		forget_target(u, t);
	}
	return 0;
}

/*
 * MODULE_STATE_COMING of a module that applied updates wait for, oldest first: resolve and check
 * each, and write its held fields at once, so that an update stacked on it (whose pre code is
 * this one's new code, fields included) is checked against the fields as they are for this
 * load; then write the jumps of those that match, with text_poke. No stop_machine: none of the
 * module's code has run yet. A mismatch refuses the load unless refuse_mismatch is off; then
 * that update waits on. (Held fields written for a load that is then refused are harmless:
 * nothing jumps to the new code of a target that is not patched.) The author's hooks of each
 * target run as an apply runs them: PRE_APPLY before the writes (no lock held: they may sleep; one
 * that fails refuses the load, or with refuse_mismatch off leaves that update waiting), then
 * under text_mutex the CHECK_APPLY hooks of every target before any write, APPLY after each
 * target's writes (both with interrupts off), POST_APPLY (or FAIL_APPLY) after.
 */
static int module_coming(struct module *mod)
{
	struct ls_update *u;
	struct ls_target *t;
	char why[320];
	bool wrote = false;
	unsigned long flags;
	int i, ret, failed = 0;

	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || t->patched)
			continue;
		ret = resolve_target(u, t, mod, why, sizeof(why));
		if (!ret) {
			mutex_lock(&text_mutex);
			write_held(t);
			mutex_unlock(&text_mutex);
			t->pending = true;
			t->mod = mod;
			continue;
		}
		if (refuse_mismatch) {
			pr_err("livesplice: update %s: refusing to load %s: %s (the update is for build id %s)\n",
			       u->id, mod->name, why, t->build_id);
			forget_instance(mod);
			return -EINVAL;
		}
		pr_warn("livesplice: update %s: %s loads unpatched: %s (the update is for build id %s)\n",
			u->id, mod->name, why, t->build_id);
	}
	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || !t->pending)
			continue;
		t->pre_ran = true;
		ret = run_hooks(u, LS_PRE_APPLY, t - u->targets, false, &failed);
		if (!ret)
			continue;
		if (refuse_mismatch) {
			pr_err("livesplice: update %s: refusing to load %s: pre_apply hook %ps returned %d\n",
			       u->id, mod->name, (void *)u->hooks[failed].fn, ret);
			finish_coming_hooks(mod, true);
			forget_instance(mod);
			return -EINVAL;
		}
		pr_warn("livesplice: update %s: %s loads unpatched: pre_apply hook %ps returned %d\n",
			u->id, mod->name, (void *)u->hooks[failed].fn, ret);
		forget_target(u, t);
	}
	mutex_lock(&text_mutex);
	if (check_coming_hooks(mod, why, sizeof(why))) {
		mutex_unlock(&text_mutex);
		pr_err("livesplice: refusing to load %s: %s\n", mod->name, why);
		finish_coming_hooks(mod, true);
		forget_instance(mod);
		return -EINVAL;
	}
	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || !t->pending)
			continue;
		/* The sites again, under text_mutex, right before the write: a kprobe registered
		 * since the check arms its int3 under it too. A stacked function expects the older
		 * update's jump, written just before (or left out: then this one fails too). */
		for (i = t->first; i < t->first + t->nfuncs; i++) {
			struct ls_func *f = &u->funcs[i];

			if (!memcmp((void *)f->site, f->expect, JMP_SIZE))
				continue;
			snprintf(why, sizeof(why), "%.128s: the bytes at its jump site (+%#x) changed since they were checked (%*phN, not %*phN): a probe?",
				 f->name, f->fentry, JMP_SIZE, (void *)f->site, JMP_SIZE, f->expect);
			break;
		}
		if (i < t->first + t->nfuncs) {
			if (refuse_mismatch) {
				mutex_unlock(&text_mutex);
				pr_err("livesplice: update %s: refusing to load %s: %s\n", u->id, mod->name,
				       why);
				finish_coming_hooks(mod, true);
				forget_instance(mod);
				return -EINVAL;
			}
			pr_warn("livesplice: update %s: %s loads unpatched: %s\n", u->id, mod->name, why);
			forget_target(u, t);
			continue;
		}
		for (i = t->first; i < t->first + t->nfuncs; i++) {
			struct ls_func *f = &u->funcs[i];

			memcpy(f->saved, (void *)f->site, JMP_SIZE);
			text_poke((void *)f->site, f->jump, JMP_SIZE);
		}
		local_irq_save(flags);
		run_hooks(u, LS_APPLY, t - u->targets, false, NULL);
		local_irq_restore(flags);
		t->pending = false;
		t->patched = true;
		wrote = true;
		pr_info("livesplice: update %s: patched %s (%d functions)\n", u->id, mod->name,
			t->nfuncs);
	}
	mutex_unlock(&text_mutex);
	if (wrote)
		on_each_cpu(ls_sync_core, NULL, 1);
	finish_coming_hooks(mod, false);
	return 0;
}

#define UNSEEN_TRIES 5
#define UNSEEN_DELAY_MS 200

/*
 * Switch target t of update u (resolved: its sites set), and it alone, as an apply switches a
 * loaded module: the held fields first, then the jumps under stop_machine with the stack check.
 * u's other functions are switched already (their sites hold their jumps, which the byte check
 * would take for a mismatch), so switch_update gets a view of u with t's functions only. On
 * failure, why holds the answer an apply would have given, and t waits.
 */
static int switch_target(struct ls_update *u, struct ls_target *t, struct module *mod, char *why,
			 size_t len)
{
	struct ls_update view = *u;	/* never linked into `updates` */
	struct ls_answer a = { .buf = why, .cap = len };
	char *msg;
	int i, j, ret, nparts = 0, tgt = t - u->targets, failed = 0;

	view.funcs = &u->funcs[t->first];
	view.nfuncs = t->nfuncs;
	view.nvmlinux = 0;
	view.nranges = 0;
	for (i = 0; i < t->nfuncs; i++)
		nparts += view.funcs[i].nparts;
	view.ranges = kvcalloc(2 * t->nfuncs + nparts, sizeof(*view.ranges), GFP_KERNEL);
	if (!view.ranges) {
		snprintf(why, len, "out of memory");
		forget_target(u, t);
		return -ENOMEM;
	}
	for (i = 0; i < t->nfuncs; i++) {
		struct ls_func *f = &view.funcs[i];

		view.ranges[view.nranges++] = (struct ls_range){ f->addr, f->addr + f->size, i };
		if (f->live != f->addr)
			view.ranges[view.nranges++] = (struct ls_range){ f->live, f->live + f->size, i };
		for (j = 0; j < f->nparts; j++)
			view.ranges[view.nranges++] = (struct ls_range){
				f->parts[j].addr, f->parts[j].addr + f->parts[j].size, i };
	}
	mutex_lock(&text_mutex);	/* nothing jumps to the new code yet; the hooks may use them */
	write_held(t);
	mutex_unlock(&text_mutex);
	ret = run_hooks(u, LS_PRE_APPLY, tgt, false, &failed);
	if (ret) {
		snprintf(why, len, "pre_apply hook %ps returned %d", (void *)u->hooks[failed].fn, ret);
		run_hooks(u, LS_FAIL_APPLY, tgt, false, NULL);
		kvfree(view.ranges);
		forget_target(u, t);
		return -ECANCELED;
	}
	why[0] = '\0';
	ret = switch_update(&view, false, UNSEEN_TRIES, UNSEEN_DELAY_MS, tgt, &a);
	kvfree(view.ranges);
	if (ret) {
		run_hooks(u, LS_FAIL_APPLY, tgt, false, NULL);
		/* The answer's message, without its "STATUS apply ID " and newline. */
		for (i = 0, msg = why; i < 3 && msg; i++)
			msg = strchr(msg, ' ') ? strchr(msg, ' ') + 1 : NULL;
		if (msg)
			memmove(why, msg, strlen(msg) + 1);
		why[strcspn(why, "\n")] = '\0';
		forget_target(u, t);
		return ret;
	}
	t->patched = true;
	t->mod = mod;
	run_hooks(u, LS_POST_APPLY, tgt, false, NULL);
	return 0;
}

/*
 * MODULE_STATE_LIVE of a module whose MODULE_STATE_COMING this core did not handle: its notifier
 * chain had run before the core registered its notifier (the core was loaded, as the first apply
 * loads it, while the module's init ran), or the core could not note it. An apply meanwhile left
 * it waiting: a module coming unseen may as well be one whose COMING the notifier has yet to
 * handle, which must not be patched at apply (see `coming`). Now its init is done and it is
 * live, so each update that waits for it is patched as an apply patches a loaded module, rather
 * than leave it running unpatched until its next load while its updates say "waiting". A
 * mismatch cannot refuse a load that is done: it is logged, and the update waits on.
 */
static void module_live_unseen(struct module *mod)
{
	struct ls_update *u;
	struct ls_target *t;
	char why[320];
	int ret;

	list_for_each_entry(u, &updates, list) {
		t = find_target(u, mod->name);
		if (!t || t->patched)
			continue;
		ret = resolve_target(u, t, mod, why, sizeof(why));
		if (!ret)
			ret = switch_target(u, t, mod, why, sizeof(why));
		if (ret) {
			pr_warn("livesplice: update %s: %s is loaded but not patched: %s (the update is for build id %s); patched when it loads again\n",
				u->id, mod->name, why, t->build_id);
			continue;
		}
		pr_info("livesplice: update %s: patched %s (%d functions)\n", u->id, mod->name,
			t->nfuncs);
	}
}

/* MODULE_STATE_GOING: the module's text goes with it; its updates forget their sites there. */
static void module_going(struct module *mod)
{
	struct ls_update *u;
	struct ls_target *t;
	unsigned long flags;

	list_for_each_entry_reverse(u, &updates, list) {	/* newest first, as undo goes */
		t = find_target(u, mod->name);
		if (!t || !t->patched || t->mod != mod)
			continue;
		/* As livepatch does for a patched module that goes: the target's hooks of a switch
		 * back, but PRE_REVERSE cannot stop the unload and there is no CHECK (nothing is
		 * written: the module's code goes, its exit has run). */
		run_hooks(u, LS_PRE_REVERSE, t - u->targets, true, NULL);
		local_irq_save(flags);
		run_hooks(u, LS_REVERSE, t - u->targets, true, NULL);
		local_irq_restore(flags);
		forget_target(u, t);
		run_hooks(u, LS_POST_REVERSE, t - u->targets, true, NULL);
		pr_info("livesplice: update %s: %s unloaded; patched again when it loads\n", u->id,
			mod->name);
	}
}

static void update_module_going(struct module *mod);

static int ls_module_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct module *mod = data;
	int ret = 0;

	switch (action) {
	case MODULE_STATE_COMING:
		if (!note_coming(mod, kmalloc(sizeof(struct ls_coming), GFP_KERNEL)))
			break;
		mutex_lock(&ls_mutex);
		ret = module_coming(mod);
		mutex_unlock(&ls_mutex);
		if (ret)	/* refused: freed with no MODULE_STATE_GOING for this notifier */
			forget_coming(mod);
		break;
	case MODULE_STATE_LIVE:
		if (forget_coming(mod))
			break;
		/* The state written before `named` is read: pairs with publish_names(). */
		smp_mb();
		if (!is_named(mod->name))
			break;
		mutex_lock(&ls_mutex);
		module_live_unseen(mod);
		mutex_unlock(&ls_mutex);
		break;
	case MODULE_STATE_GOING:
		forget_coming(mod);
		/* The state written before `named` is read: pairs with publish_names(). */
		smp_mb();
		if (!is_named(mod->name))
			break;
		mutex_lock(&ls_mutex);
		update_module_going(mod);
		module_going(mod);
		mutex_unlock(&ls_mutex);
		break;
	}
	return notifier_from_errno(ret);
}

/* Below jump_label (1) and static_call (0): their sites in the module are settled. */
static struct notifier_block ls_module_nb = {
	.notifier_call = ls_module_notify,
	.priority = -1,
};

/* --- apply ------------------------------------------------------------------------------------- */

struct ls_counts {
	int f, r, t, p, q, b, m, c, h, k, w;
};

/* How many lines of each kind follow the first: the request is allocated for exactly those. */
static void count_lines(const char *req, struct ls_counts *n)
{
	const char *p = strchr(req, '\n');

	memset(n, 0, sizeof(*n));
	while (p) {
		switch (*++p) {
		case 'f': n->f++; break;
		case 'r': n->r++; break;
		case 't': n->t++; break;
		case 'p': n->p++; break;
		case 'q': n->q++; break;
		case 'b': n->b++; break;
		case 'm': n->m++; break;
		case 'c': n->c++; break;
		case 'h': n->h++; break;
		case 'k': n->k++; break;
		case 'w': n->w++; break;
		}
		p = strchr(p, '\n');
	}
}

/* Where the parse of a request is: the next free entry of each kind, the current t and p line. */
struct ls_parse {
	int f, r, p, t, c, h, m, q, k, w;
	struct ls_target *target;
	struct ls_func *func;
	/* The p lines' SIZEs so far, and what the request can carry: its b lines give every byte
	 * in two hex digits, so a valid request never asks for more than half its length. Each p
	 * line allocates before its b lines are read (SIZE bytes and a bitmap of SIZE bits). */
	size_t code_bytes, code_budget;
	bool too_much_code, out_of_memory;
};

/* A field of a c or h line: TYPE NAME SYMPOS ADDEND after its place. */
static bool parse_field(struct ls_field *fl, char **tok)
{
	if (kstrtouint(tok[0], 10, &fl->type) || !field_width(fl->type) ||
	    !valid_token(tok[1], KSYM_NAME_LEN) || !parse_uint(tok[2], MAX_SYMPOS, &fl->sympos) ||
	    kstrtos64(tok[3], 10, &fl->addend))
		return false;
	fl->name = kstrdup(tok[1], LS_GFP);
	return fl->name != NULL;
}

/* One t, p, q, b, m, c or h line (a module target), checked; false if it is bad. */
static bool parse_target_line(struct ls_update *u, struct ls_parse *ps, char *line)
{
	char *tok[6];
	int n = split_tokens(line, tok, ARRAY_SIZE(tok));
	struct ls_func *f = ps->func;
	unsigned int off, len;

	if (n < 1 || strlen(tok[0]) != 1)
		return false;
	switch (tok[0][0]) {
	case 't': {
		struct ls_target *t = &u->targets[ps->t];

		/* "vmlinux" names vmlinux in the state */
		if (n != 3 || !valid_token(tok[1], MODULE_NAME_LEN) || !strcmp(tok[1], "vmlinux") ||
		    !valid_build_id(tok[2]) || find_target(u, tok[1]))
			return false;
		strscpy(t->name, tok[1], sizeof(t->name));
		strscpy(t->build_id, tok[2], sizeof(t->build_id));
		t->first = u->nvmlinux + ps->p;
		t->held = &u->held[ps->h];
		ps->target = t;
		ps->func = NULL;
		u->ntargets = ++ps->t;
		return true;
	}
	case 'p':
		if (n != 6 || !ps->target)
			return false;
		f = &u->funcs[u->nvmlinux + ps->p];
		f->tgt = ps->target - u->targets;
		if (!valid_token(tok[1], KSYM_NAME_LEN) ||
		    !parse_uint(tok[2], MAX_SYMPOS, &f->sympos) || !f->sympos ||
		    !parse_uint(tok[3], MAX_CODE_SIZE, &f->size) || f->size < JMP_SIZE ||
		    !parse_uint(tok[4], MAX_CODE_SIZE, &f->fentry) || f->fentry > f->size - JMP_SIZE ||
		    kstrtoul(tok[5], 16, &f->target))
			return false;
		strscpy(f->name, tok[1], sizeof(f->name));
		if (f->size > ps->code_budget - ps->code_bytes) {
			ps->too_much_code = true;
			return false;
		}
		ps->code_bytes += f->size;
		f->code = kvmalloc(f->size, LS_GFP);
		f->cmp = kvcalloc(BITS_TO_LONGS(f->size), sizeof(long), LS_GFP);
		if (!f->code || !f->cmp) {
			ps->out_of_memory = true;
			return false;
		}
		f->masks = &u->masks[ps->m];
		f->checks = &u->checks[ps->c];
		f->parts = &u->parts[ps->q];
		ps->target->nfuncs++;
		ps->func = f;
		ps->p++;
		return true;
	case 'q': {
		struct ls_part *part = &u->parts[ps->q];

		/* A part of the last p line's function: the module's own symbol, like it. */
		if (n != 4 || !f || !valid_token(tok[1], KSYM_NAME_LEN) ||
		    !parse_uint(tok[2], MAX_SYMPOS, &part->sympos) || !part->sympos ||
		    !parse_uint(tok[3], MAX_CODE_SIZE, &part->size) || !part->size)
			return false;
		part->name = kstrdup(tok[1], LS_GFP);
		if (!part->name) {
			ps->out_of_memory = true;
			return false;
		}
		ps->q++;
		f->nparts++;
		return true;
	}
	case 'b':
		/* All SIZE bytes are given, each once, in any order; cmp marks the given ones. */
		if (n != 3 || !f)
			return false;
		len = strlen(tok[2]) / 2;
		if (!parse_uint(tok[1], MAX_CODE_SIZE, &off) || !len ||
		    len > MAX_B_BYTES || strlen(tok[2]) != 2 * len || off > f->size ||
		    len > f->size - off || find_next_bit(f->cmp, off + len, off) < off + len ||
		    hex2bin(f->code + off, tok[2], len))
			return false;
		bitmap_set(f->cmp, off, len);
		return true;
	case 'm':
		if (n != 3 || !f || !parse_uint(tok[1], MAX_CODE_SIZE, &off) ||
		    !parse_uint(tok[2], MAX_CODE_SIZE, &len) || !len || off > f->size ||
		    len > f->size - off)
			return false;
		u->masks[ps->m].offset = off;
		u->masks[ps->m].length = len;
		ps->m++;
		f->nmasks++;
		return true;
	case 'c': {
		struct ls_field *c = &u->checks[ps->c];

		if (n != 6 || !f || !parse_uint(tok[1], MAX_CODE_SIZE, &off) ||
		    !parse_field(c, tok + 2) || off > f->size || field_width(c->type) > f->size - off)
			return false;
		c->where = off;
		ps->c++;
		f->nchecks++;
		return true;
	}
	case 'h': {
		struct ls_field *h = &u->held[ps->h];

		if (n != 6 || !ps->target || kstrtoul(tok[1], 16, &h->where) || !parse_field(h, tok + 2))
			return false;
		ps->h++;
		ps->target->nheld++;
		return true;
	}
	}
	return false;
}

/* A k line: KIND TARGET ADDR, the target "vmlinux" or one of the t lines before it. The address
 * is checked against the update's module once it is found (hooks_in_module). */
static bool parse_hook(struct ls_update *u, struct ls_parse *ps, char *line)
{
	struct ls_hook *h = &u->hooks[ps->k];
	struct ls_target *t;
	char *tok[4];

	if (split_tokens(line, tok, ARRAY_SIZE(tok)) != 4 || strcmp(tok[0], "k"))
		return false;
	h->kind = match_string(hook_kinds, LS_NHOOK_KINDS, tok[1]);
	if (h->kind < 0 || kstrtoul(tok[3], 16, &h->fn) || !h->fn)
		return false;
	if (!strcmp(tok[2], "vmlinux")) {
		h->tgt = -1;
	} else {
		t = valid_token(tok[2], MODULE_NAME_LEN) ? find_target(u, tok[2]) : NULL;
		if (!t)
			return false;
		h->tgt = t - u->targets;
	}
	u->nhooks = ++ps->k;
	return true;
}

/* w NAME ADDR LEN SOURCE OLD_HEX: a rewrite of vmlinux's read-only data (check_writes). */
static bool parse_write(struct ls_update *u, struct ls_parse *ps, char *line)
{
	struct ls_write *w = &u->writes[ps->w];
	unsigned int len;
	char *tok[6];

	if (split_tokens(line, tok, ARRAY_SIZE(tok)) != 6 || strcmp(tok[0], "w") ||
	    !valid_token(tok[1], KSYM_NAME_LEN) || kstrtoul(tok[2], 16, &w->addr) ||
	    !parse_uint(tok[3], MAX_WRITE_SIZE, &len) || !len || kstrtoul(tok[4], 16, &w->source))
		return false;
	strscpy(w->name, tok[1], sizeof(w->name));
	w->len = len;
	w->old = kmalloc(len, LS_GFP);
	w->new = kmalloc(len, LS_GFP);
	u->nwrites = ++ps->w;		/* free_update frees what this line allocated */
	if (!w->old || !w->new) {
		ps->out_of_memory = true;
		return false;
	}
	return !parse_hex(tok[5], w->old, len);
}

static bool overlap(unsigned long a, unsigned int alen, unsigned long b, unsigned int blen)
{
	return a < b + blen && b < a + alen;
}

/*
 * Each write lies within vmlinux's read-only data ([__start_rodata, __end_rodata): const and
 * __ro_after_init objects; never code, never writable data) and within the object it names; its
 * new bytes are in the update's module's read-only data. Writes do not overlap each other, nor
 * an applied update's: a rewrite never stacks on another (its old bytes could lead into that
 * update's module, which may be gone by the time this one is undone).
 */
static int check_writes(struct ls_update *u, struct ls_answer *a)
{
	char sym[KSYM_SYMBOL_LEN];
	unsigned long size, offset;
	struct ls_update *other;
	int i, j;

	for (i = 0; i < u->nwrites; i++) {
		struct ls_write *w = &u->writes[i];
		unsigned long last = w->addr + w->len - 1;

		if (last < w->addr || !is_kernel_rodata(w->addr) || !is_kernel_rodata(last)) {
			say(a, "error apply %s bad write %lx+%u of %s: not vmlinux's read-only data\n",
			    u->id, w->addr, w->len, w->name);
			return -EINVAL;
		}
		sprint_symbol_no_offset(sym, w->addr);
		if (!kallsyms_lookup_size_offset(w->addr, &size, &offset) || strcmp(sym, w->name) ||
		    offset + w->len > size) {
			say(a, "error apply %s bad write %lx+%u: not within %s (the kernel has %s there)\n",
			    u->id, w->addr, w->len, w->name, sym);
			return -EINVAL;
		}
		if (!in_core_rodata(u->mod, w->source, w->len)) {
			say(a, "error apply %s bad source %lx of the write of %s: not in module %s's read-only data\n",
			    u->id, w->source, w->name, u->mod->name);
			return -EINVAL;
		}
		for (j = 0; j < i; j++) {
			if (overlap(w->addr, w->len, u->writes[j].addr, u->writes[j].len)) {
				say(a, "error apply %s writes of %s overlap\n", u->id, w->name);
				return -EINVAL;
			}
		}
		memcpy(w->new, (void *)w->source, w->len);
	}
	list_for_each_entry(other, &updates, list) {
		for (i = 0; i < u->nwrites; i++) {
			struct ls_write *w = &u->writes[i];

			for (j = 0; j < other->nwrites; j++) {
				struct ls_write *o = &other->writes[j];

				if (overlap(w->addr, w->len, o->addr, o->len)) {
					say(a, "error apply %s its rewrite of %s overlaps update %s's\n",
					    u->id, w->name, other->id);
					return -EINVAL;
				}
			}
		}
	}
	return 0;
}

/* Every hook is a function of the update's own module (its core text). */
static int hooks_in_module(struct ls_update *u, struct ls_answer *a)
{
	unsigned long size, offset;
	int i;

	for (i = 0; i < u->nhooks; i++) {
		unsigned long fn = u->hooks[i].fn;

		if (text_module(fn) != u->mod || !in_core_text(u->mod, fn, 1)) {
			say(a, "error apply %s hook %d (%s) at %#lx is not in module %s's text\n",
			    u->id, i, hook_kinds[u->hooks[i].kind], fn, u->mod->name);
			return -EINVAL;
		}
		/* a function's start, which an indirect call may reach (ENDBR under IBT) */
		if (!kallsyms_lookup_size_offset(fn, &size, &offset) || offset ||
		    (cpu_feature_enabled(X86_FEATURE_IBT) && !is_endbr(*(u32 *)fn))) {
			say(a, "error apply %s hook %d (%s) at %pS is not the start of a function an indirect call may reach\n",
			    u->id, i, hook_kinds[u->hooks[i].kind], (void *)fn);
			return -EINVAL;
		}
	}
	return 0;
}

static bool target_has_hooks(struct ls_update *u, int tgt)
{
	int i;

	for (i = 0; i < u->nhooks; i++)
		if (u->hooks[i].tgt == tgt)
			return true;
	return false;
}

/* After the last line: every target has functions, every function all its bytes; the bytes
 * compared are those given, less the masks and the c fields (checked by value). */
static int finish_targets(struct ls_update *u, struct ls_answer *a)
{
	int i, j;

	for (i = 0; i < u->ntargets; i++) {
		if (!u->targets[i].nfuncs && !target_has_hooks(u, i)) {
			say(a, "error apply %s target %s has no functions and no hooks\n", u->id,
			    u->targets[i].name);
			return -EINVAL;
		}
	}
	for (i = u->nvmlinux; i < u->nfuncs; i++) {
		struct ls_func *f = &u->funcs[i];

		if (!bitmap_full(f->cmp, f->size)) {
			say(a, "error apply %s %s: its b lines do not give all its %u bytes\n", u->id,
			    f->name, f->size);
			return -EINVAL;
		}
		for (j = 0; j < f->nmasks; j++)
			bitmap_clear(f->cmp, f->masks[j].offset, f->masks[j].length);
		for (j = 0; j < f->nchecks; j++)
			bitmap_clear(f->cmp, f->checks[j].where, field_width(f->checks[j].type));
	}
	return 0;
}

/* Allocate an update for exactly the lines counted, within the protocol's bounds. */
static int alloc_update(struct ls_update *u, const struct ls_counts *n, struct ls_answer *a)
{
	if (n->f + n->p > MAX_FUNCS || n->q > MAX_FUNCS || n->r > MAX_RANGES ||
	    n->t > MAX_TARGETS || n->c + n->h > MAX_FIELDS || n->m > MAX_MASKS ||
	    n->k > MAX_HOOKS || n->w > MAX_WRITES) {
		say(a, "error apply %s too many lines: at most %d f and p, %d q, %d r, %d t, %d c and h, %d m, %d k, %d w\n",
		    u->id, MAX_FUNCS, MAX_FUNCS, MAX_RANGES, MAX_TARGETS, MAX_FIELDS, MAX_MASKS,
		    MAX_HOOKS, MAX_WRITES);
		return -EINVAL;
	}
	u->nvmlinux = n->f;
	u->nfuncs = n->f + n->p;
	u->nchecks = n->c;
	u->nheld = n->h;
	u->nmasks = n->m;
	u->nparts = n->q;
	/* the module functions' old code, where it runs, and their parts */
	u->maxranges = n->r + 2 * n->p + n->q;
	u->funcs = kvcalloc(max(u->nfuncs, 1), sizeof(*u->funcs), LS_GFP);
	u->ranges = kvcalloc(max(u->maxranges, 1), sizeof(*u->ranges), LS_GFP);
	u->targets = kvcalloc(max(n->t, 1), sizeof(*u->targets), LS_GFP);
	u->checks = kvcalloc(max(n->c, 1), sizeof(*u->checks), LS_GFP);
	u->held = kvcalloc(max(n->h, 1), sizeof(*u->held), LS_GFP);
	u->masks = kvcalloc(max(n->m, 1), sizeof(*u->masks), LS_GFP);
	u->parts = kvcalloc(max(n->q, 1), sizeof(*u->parts), LS_GFP);
	u->hooks = kvcalloc(max(n->k, 1), sizeof(*u->hooks), LS_GFP);
	u->writes = kvcalloc(max(n->w, 1), sizeof(*u->writes), LS_GFP);
	if (!u->funcs || !u->ranges || !u->targets || !u->checks || !u->held || !u->masks ||
	    !u->parts || !u->hooks || !u->writes) {
		say(a, "error apply %s out of memory\n", u->id);
		return -ENOMEM;
	}
	return 0;
}

static const char *resolve_status(int ret)
{
	return ret == -EILSEQ ? "mismatch" : ret == -EPERM ? "refused" : "error";
}

/*
 * apply ID MODULE TRIES DELAY_MS
 * f NAME SITE TARGET EXPECT_HEX      one per vmlinux function
 * r START END FUNC_INDEX             old code to find no thread in
 * t, p, q, b, m, c, h                module targets (docs/core-protocol.md, protocol 3)
 * k KIND TARGET ADDR                 the patch author's hooks (feature `hooks`), after the t lines
 */
static int handle_apply(char *req, struct ls_answer *a)
{
	struct ls_update *u;
	struct ls_counts counts;
	struct ls_parse ps = {};
	char *line;
	char modname[MODULE_NAME_LEN], hex[2 * JMP_SIZE + 2], why[320];
	int tries, delay, ret = -EINVAL, i, k, failed = 0;
	size_t linelen = 0, j;
	struct module *mod;
	bool pre_ran = false;

	count_lines(req, &counts);
	ps.code_budget = strlen(req) / 2;
	line = strsep(&req, "\n");
	u = kzalloc(sizeof(*u), GFP_KERNEL);
	if (!u) {
		say(a, "error apply - out of memory\n");
		return -ENOMEM;
	}
	if (sscanf(line, "apply %47s %55s %d %d", u->id, modname, &tries, &delay) != 4 ||
	    !valid_id(u->id) || !valid_token(modname, MODULE_NAME_LEN) || tries < 1 || tries > 1000 ||
	    delay < 0 || delay > 60000 || (u64)tries * delay > MAX_WAIT_MS) {
		say(a, "error apply - bad apply line\n");
		goto out;
	}
	ret = alloc_update(u, &counts, a);
	if (ret)
		goto out;
	ret = -EINVAL;
	while ((line = strsep(&req, "\n")) != NULL) {
		struct ls_func *f;
		unsigned long x, y;
		int idx;

		if (!*line)
			continue;
		linelen = strlen(line);
		if (line[0] == 'f') {
			f = &u->funcs[ps.f];
			f->tgt = -1;
			if (sscanf(line, "f %511s %lx %lx %11s", f->name, &f->site, &f->target, hex) != 4 ||
			    !valid_token(f->name, KSYM_NAME_LEN) || parse_hex(hex, f->expect, JMP_SIZE))
				goto bad_line;
			ps.f++;
		} else if (line[0] == 'r' && sscanf(line, "r %lx %lx %d", &x, &y, &idx) == 3 &&
			   idx >= 0 && idx < ps.f) {
			u->ranges[ps.r].start = x;
			u->ranges[ps.r].end = y;
			u->ranges[ps.r].func = idx;
			u->nranges = ++ps.r;
		} else if (line[0] == 'k') {
			if (!parse_hook(u, &ps, line))
				goto bad_line;
		} else if (line[0] == 'w') {
			if (!parse_write(u, &ps, line)) {
				if (ps.out_of_memory) {
					say(a, "error apply %s out of memory\n", u->id);
					ret = -ENOMEM;
					goto out;
				}
				goto bad_line;
			}
		} else if (!strchr("tpqbmch", line[0]) || !parse_target_line(u, &ps, line)) {
			if (ps.too_much_code) {
				say(a, "error apply %s the p lines ask for more bytes of code than the request carries (%zu bytes at most)\n",
				    u->id, ps.code_budget);
				goto out;
			}
			if (ps.out_of_memory) {
				say(a, "error apply %s out of memory\n", u->id);
				ret = -ENOMEM;
				goto out;
			}
			goto bad_line;
		}
	}
	if (!u->nfuncs && !u->nhooks && !u->nwrites) {
		say(a, "error apply %s no functions, hooks or writes\n", u->id);
		goto out;
	}
	ret = finish_targets(u, a);
	if (ret)
		goto out;
	ret = -EINVAL;
	if (find_update(u->id)) {
		say(a, "error apply %s an update with this id is applied\n", u->id);
		goto out;
	}
	/* From here on the notifier takes ls_mutex for the update's modules (see names_lock). */
	strscpy(u->modname, modname, sizeof(u->modname));
	publish_names(u);
	/* The new code's module, pinned while the update is applied. */
	mutex_lock(&module_mutex);
	mod = find_module(modname);
	if (mod && (mod->state != MODULE_STATE_LIVE || !try_module_get(mod)))
		mod = NULL;
	mutex_unlock(&module_mutex);
	if (!mod) {
		say(a, "error apply %s module %s is not loaded\n", u->id, modname);
		goto out;
	}
	u->mod = mod;
	ret = hooks_in_module(u, a);
	if (!ret)
		ret = check_funcs(u, a);
	if (!ret)
		ret = check_targets(u, a);
	if (!ret)
		ret = check_writes(u, a);
	/* Module targets loaded now are patched in this switch; the others wait for their load. */
	for (i = 0; !ret && i < u->ntargets; i++) {
		struct ls_target *t = &u->targets[i];
		struct module *tmod = target_to_patch(t->name);

		if (!tmod)
			continue;
		ret = resolve_target(u, t, tmod, why, sizeof(why));
		if (ret) {
			say(a, "%s apply %s %s: %s\n", resolve_status(ret), u->id, t->name, why);
			break;
		}
		t->pending = true;
		t->mod = tmod;
	}
	/* Everything checked: the held fields of the loaded targets (the hooks may use them too;
	 * nothing jumps to the new code yet), then the author's PRE_APPLY hooks, before the machine
	 * is stopped. */
	if (!ret) {
		mutex_lock(&text_mutex);
		for (i = 0; i < u->ntargets; i++)
			if (u->targets[i].pending)
				write_held(&u->targets[i]);
		mutex_unlock(&text_mutex);
		pre_ran = true;
		ret = run_hooks(u, LS_PRE_APPLY, SCOPE_ALL, false, &failed);
		if (ret) {
			say(a, "refused apply %s pre_apply hook %ps returned %d: nothing was changed\n",
			    u->id, (void *)u->hooks[failed].fn, ret);
			ret = -ECANCELED;
		}
	}
	if (!ret) {
		for (i = u->nvmlinux; i < u->nfuncs; i++) {
			struct ls_func *f = &u->funcs[i];

			if (!f->site)
				continue;
			u->ranges[u->nranges++] = (struct ls_range){ f->addr, f->addr + f->size, i };
			if (f->live != f->addr)
				u->ranges[u->nranges++] =
					(struct ls_range){ f->live, f->live + f->size, i };
			for (k = 0; k < f->nparts; k++)
				u->ranges[u->nranges++] = (struct ls_range){
					f->parts[k].addr, f->parts[k].addr + f->parts[k].size, i };
		}
		ret = switch_update(u, false, tries, delay, SCOPE_ALL, a);
	}
	if (ret) {
		if (pre_ran)
			run_hooks(u, LS_FAIL_APPLY, SCOPE_ALL, false, NULL);
		module_put(mod);
		goto out;
	}
	run_hooks(u, LS_POST_APPLY, SCOPE_ALL, false, NULL);
	__module_get(THIS_MODULE);
	add_taint(TAINT_LIVEPATCH, LOCKDEP_STILL_OK);
	pr_info("livesplice: applied %s (%s): %d functions, %d data rewrites, machine stopped %llu us\n",
		u->id, mod->name, u->nfuncs, u->nwrites, div_u64(u->pause_ns, 1000));
	for (i = 0; i < u->ntargets; i++) {
		struct ls_target *t = &u->targets[i];

		if (t->pending) {
			t->pending = false;
			t->patched = true;
			pr_info("livesplice: update %s: patched %s (%d functions)\n", u->id, t->name,
				t->nfuncs);
		} else {
			pr_info("livesplice: update %s: waiting for %s\n", u->id, t->name);
		}
	}
	list_add_tail(&u->list, &updates);
	u = NULL;
out:
	free_update(u);
	return ret;
bad_line:
	for (j = 0; j < linelen; j++)	/* the tokenizer cut it at its spaces */
		if (!line[j])
			line[j] = ' ';
	say(a, "error apply %s bad line: %.200s\n", u->id[0] ? u->id : "-", line);
	goto out;
}

/* Does g (of a later update v) stack on f (of u)? The same site, or the same module function. */
static bool stacks_on(struct ls_update *u, struct ls_func *f, struct ls_update *v, struct ls_func *g)
{
	if (f->site && f->site == g->site)
		return true;
	return f->tgt >= 0 && g->tgt >= 0 && f->sympos == g->sympos && !strcmp(f->name, g->name) &&
	       !strcmp(u->targets[f->tgt].name, v->targets[g->tgt].name);
}

/* A later update that patched one of u's sites or rewrote its data, or waits to: it stacks on
 * u (*what: the function or object of u's). */
static struct ls_update *stacked_later(struct ls_update *u, const char **what)
{
	struct ls_update *later = u;
	int i, j;

	list_for_each_entry_continue(later, &updates, list) {
		for (i = 0; i < u->nfuncs; i++)
			for (j = 0; j < later->nfuncs; j++)
				if (stacks_on(u, &u->funcs[i], later, &later->funcs[j])) {
					*what = u->funcs[i].name;
					return later;
				}
		for (i = 0; i < u->nwrites; i++)
			for (j = 0; j < later->nwrites; j++)
				if (overlap(u->writes[i].addr, u->writes[i].len, later->writes[j].addr,
					    later->writes[j].len)) {
					*what = u->writes[i].name;
					return later;
				}
	}
	return NULL;
}

/* No jump leads into u's code any more and no thread is in it: wait for what it queued
 * with call_rcu(), and for any task still between its instructions that no stack showed (an
 * exiting thread past release_task(): a tasks-RCU grace period), before its code can go. */
static void forget_update(struct ls_update *u)
{
	list_del(&u->list);
	rcu_barrier();
	synchronize_rcu_tasks();
	module_put(u->mod);
	free_update(u);
	module_put(THIS_MODULE);
}

/*
 * MODULE_STATE_GOING of an applied update's own module: `rmmod -f` (MODULE_FORCE_UNLOAD ignores
 * the reference the core holds). Its exit has run, but its code is still in memory until this
 * notifier returns: switch the update back, as undo does, and forget it. If that fails (a thread
 * inside its code after every try, or a later update stacked on it) the jumps lead into code
 * about to be freed: say so as loudly as the kernel can, and taint it.
 */
static void update_module_going(struct module *mod)
{
	struct ls_update *u, *tmp, *later;
	struct ls_answer a = { .cap = 512 };
	const char *what;
	int ret;

	list_for_each_entry_safe(u, tmp, &updates, list) {
		if (u->mod != mod)
			continue;
		a.buf = kzalloc(a.cap, GFP_KERNEL);
		a.len = 0;
		later = stacked_later(u, &what);
		if (later) {
			ret = -EBUSY;
			say(&a, "update %s stacks on it (%s)", later->id, what);
		} else {
			/* no hooks: they are the going module's own code, its exit has run */
			ret = switch_update(u, true, FORCED_TRIES, FORCED_DELAY_MS, SCOPE_NONE, &a);
		}
		if (a.buf && a.len && a.buf[a.len - 1] == '\n')
			a.buf[--a.len] = '\0';
		if (ret) {
			pr_emerg("livesplice: update %s: its module %s is being removed by force, and the update cannot be switched back: %s; its jumps lead into freed code\n",
				 u->id, mod->name, a.buf ? a.buf : "");
			add_taint(TAINT_DIE, LOCKDEP_STILL_OK);
			list_del(&u->list);
			free_update(u);		/* its state refers to the module that goes */
			module_put(THIS_MODULE);
		} else {
			pr_warn("livesplice: update %s: its module %s is being removed by force: switched back\n",
				u->id, mod->name);
			forget_update(u);
		}
		kfree(a.buf);
	}
}

static int handle_undo(char *req, struct ls_answer *a)
{
	const char *what;
	char id[ID_LEN];
	int tries, delay, i, ret;
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
	later = stacked_later(u, &what);
	if (later) {
		say(a, "stacked undo %s update %s stacks on %s (%s): undo it first\n", id, later->id,
		    u->id, what);
		return -EBUSY;
	}
	/* The author's PRE_REVERSE hooks, before the machine is stopped; then patched targets switch
	 * back with vmlinux's functions; waiting ones are just forgotten. */
	ret = run_hooks(u, LS_PRE_REVERSE, SCOPE_ALL, true, &i);
	if (ret) {
		say(a, "refused undo %s pre_reverse hook %ps returned %d: nothing was changed\n",
		    u->id, (void *)u->hooks[i].fn, ret);
		ret = -ECANCELED;
	} else {
		ret = switch_update(u, true, tries, delay, SCOPE_ALL, a);
	}
	if (ret) {
		run_hooks(u, LS_FAIL_REVERSE, SCOPE_ALL, true, NULL);
		return ret;
	}
	run_hooks(u, LS_POST_REVERSE, SCOPE_ALL, true, NULL);
	pr_info("livesplice: undone %s (%s), machine stopped %llu us\n", u->id, u->mod->name,
		div_u64(u->pause_ns, 1000));
	forget_update(u);
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

/* --- shadow data (livesplice.h) -------------------------------------------------------------------
 *
 * New fields for existing objects: data attached to an object's address under a numeric id,
 * owned by the core so that it outlives the update that made it (a later update stacked on it
 * sees the same data). Lookups are RCU-protected and lock-free, changes take shadow_lock (a
 * spinlock: callers may be in any context the gfp flags they pass allow). While any shadow data
 * exists the core holds a reference on itself, so it is not unloaded under it; `state` reports
 * how many there are.
 */

struct ls_shadow {
	struct hlist_node node;
	struct rcu_head rcu;
	void *obj;
	unsigned long id;
	char data[] __aligned(sizeof(void *) * 2);
};

#define SHADOW_BITS 12
static DEFINE_HASHTABLE(shadow_table, SHADOW_BITS);
static DEFINE_SPINLOCK(shadow_lock);
static unsigned long shadow_count;	/* guarded by shadow_lock */

static unsigned long shadow_key(void *obj, unsigned long id)
{
	return hash_ptr(obj, 32) ^ id;
}

static struct ls_shadow *shadow_find(void *obj, unsigned long id)
{
	struct ls_shadow *sh;

	hash_for_each_possible_rcu(shadow_table, sh, node, shadow_key(obj, id),
				   lockdep_is_held(&shadow_lock))
		if (sh->obj == obj && sh->id == id)
			return sh;
	return NULL;
}

void *livesplice_shadow_get(void *obj, unsigned long id)
{
	struct ls_shadow *sh;

	rcu_read_lock();
	sh = shadow_find(obj, id);
	rcu_read_unlock();
	return sh ? sh->data : NULL;
}
EXPORT_SYMBOL_GPL(livesplice_shadow_get);

static void *shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp, bool or_get)
{
	struct ls_shadow *sh, *new;
	unsigned long flags;

	if (size > KMALLOC_MAX_SIZE - sizeof(*new))
		return NULL;
	new = kzalloc(sizeof(*new) + size, gfp);	/* outside the lock: gfp may sleep */
	if (!new)
		return NULL;
	new->obj = obj;
	new->id = id;
	spin_lock_irqsave(&shadow_lock, flags);
	sh = shadow_find(obj, id);
	if (sh) {
		spin_unlock_irqrestore(&shadow_lock, flags);
		kfree(new);
		return or_get ? sh->data : NULL;
	}
	hash_add_rcu(shadow_table, &new->node, shadow_key(obj, id));
	if (shadow_count++ == 0)
		__module_get(THIS_MODULE);
	spin_unlock_irqrestore(&shadow_lock, flags);
	return new->data;
}

void *livesplice_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp)
{
	return shadow_alloc(obj, id, size, gfp, false);
}
EXPORT_SYMBOL_GPL(livesplice_shadow_alloc);

void *livesplice_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp)
{
	void *data = livesplice_shadow_get(obj, id);

	return data ? data : shadow_alloc(obj, id, size, gfp, true);
}
EXPORT_SYMBOL_GPL(livesplice_shadow_get_or_alloc);

/* Under shadow_lock. The last one gone drops the core's reference on itself. */
static void shadow_remove(struct ls_shadow *sh)
{
	hash_del_rcu(&sh->node);
	kfree_rcu(sh, rcu);
	if (--shadow_count == 0)
		module_put(THIS_MODULE);
}

void livesplice_shadow_free(void *obj, unsigned long id)
{
	struct ls_shadow *sh;
	unsigned long flags;

	spin_lock_irqsave(&shadow_lock, flags);
	sh = shadow_find(obj, id);
	if (sh)
		shadow_remove(sh);
	spin_unlock_irqrestore(&shadow_lock, flags);
}
EXPORT_SYMBOL_GPL(livesplice_shadow_free);

void livesplice_shadow_free_all(unsigned long id)
{
	struct ls_shadow *sh;
	struct hlist_node *tmp;
	unsigned long flags;
	int bkt;

	spin_lock_irqsave(&shadow_lock, flags);
	hash_for_each_safe(shadow_table, bkt, tmp, sh, node)
		if (sh->id == id)
			shadow_remove(sh);
	spin_unlock_irqrestore(&shadow_lock, flags);
}
EXPORT_SYMBOL_GPL(livesplice_shadow_free_all);

static void livesplice_shadow_free_all_ids(void)
{
	struct ls_shadow *sh;
	struct hlist_node *tmp;
	unsigned long flags;
	int bkt;

	spin_lock_irqsave(&shadow_lock, flags);
	hash_for_each_safe(shadow_table, bkt, tmp, sh, node) {
		hash_del_rcu(&sh->node);
		kfree_rcu(sh, rcu);
	}
	shadow_count = 0;
	spin_unlock_irqrestore(&shadow_lock, flags);
}

static unsigned long shadow_in_use(void)
{
	unsigned long flags, n;

	spin_lock_irqsave(&shadow_lock, flags);
	n = shadow_count;
	spin_unlock_irqrestore(&shadow_lock, flags);
	return n;
}

/* state: the core's protocol, features and shadow data; the applied updates, oldest first. */
static int handle_state(struct ls_answer *a)
{
	struct ls_update *u;
	int i;

	say(a, "ok state - protocol=%d shadow=%lu features=%s\n", LIVESPLICE_PROTOCOL,
	    shadow_in_use(), LIVESPLICE_FEATURES);
	list_for_each_entry(u, &updates, list) {
		say(a, "update %s %s %d pause_ns=%llu work_ns=%llu attempts=%d\n", u->id,
		    u->mod->name, u->nfuncs, u->pause_ns, u->work_ns, u->attempts);
		for (i = 0; i < u->nfuncs; i++) {
			struct ls_func *f = &u->funcs[i];
			const char *target = f->tgt < 0 ? "vmlinux" : u->targets[f->tgt].name;

			if (f->site)
				say(a, "func %s %s %lx %lx %*phN %s\n", u->id, f->name, f->site,
				    f->target, JMP_SIZE, f->saved, target);
			else	/* its target waits */
				say(a, "func %s %s 0 %lx - %s\n", u->id, f->name, f->target, target);
		}
		for (i = 0; i < u->ntargets; i++)
			say(a, "target %s %s %s\n", u->id, u->targets[i].name,
			    u->targets[i].patched ? "patched" : "waiting");
		for (i = 0; i < u->nwrites; i++)
			say(a, "data %s %s %lx %u\n", u->id, u->writes[i].name, u->writes[i].addr,
			    u->writes[i].len);
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
			cap += 256 + u->nfuncs * (KSYM_NAME_LEN + MODULE_NAME_LEN + 128) +
			       u->ntargets * (ID_LEN + MODULE_NAME_LEN + 32);
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
	ret = register_module_notifier(&ls_module_nb);
	if (ret)
		goto no_module_notifier;
	ret = misc_register(&ls_dev);
	if (ret)
		goto no_device;
	return 0;
no_device:
	unregister_module_notifier(&ls_module_nb);
no_module_notifier:
	unregister_die_notifier(&ls_int3_nb);
	return ret;
}

static void __exit livesplice_core_exit(void)
{
	struct ls_coming *c, *tmp;

	misc_deregister(&ls_dev);
	unregister_module_notifier(&ls_module_nb);	/* waits for a call in progress */
	list_for_each_entry_safe(c, tmp, &coming, list) {	/* the notifier is gone */
		list_del(&c->list);
		kfree(c);
	}
	unregister_die_notifier(&ls_int3_nb);
	/* A parked task may still be returning from ls_park_fn(). */
	synchronize_rcu_tasks();
	/* Only a forced unload (rmmod -f) gets here with shadow data: no update is left to use it. */
	livesplice_shadow_free_all_ids();
}

module_init(livesplice_core_init);
module_exit(livesplice_core_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("livesplice core: switches kernel functions under stop_machine, and module targets at their load");
MODULE_INFO(livesplice_protocol, __stringify(LIVESPLICE_PROTOCOL));
