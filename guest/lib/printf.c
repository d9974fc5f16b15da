/*
 * printf.c - a small printf family: one formatter, two sinks (the serial
 * port, a buffer).
 *
 * Conversions: d i u x X o c s p %.  Flags: - 0 space + #.  Width and
 * precision, either may be '*'.  Length: hh h l ll z t j.  No floating point.
 */
#include "guest.h"

struct sink {
    void (*put)(struct sink *, char);
    char *buf;
    size_t size;        /* buffer size */
    size_t len;         /* characters produced so far (may exceed size) */
};

static void put_serial(struct sink *s, char c)
{
    serial_putc(c);
    s->len++;
}

static void put_buf(struct sink *s, char c)
{
    if (s->len + 1 < s->size)
        s->buf[s->len] = c;
    s->len++;
}

static void pad(struct sink *s, char c, int n)
{
    while (n-- > 0)
        s->put(s, c);
}

enum { F_LEFT = 1, F_ZERO = 2, F_SPACE = 4, F_PLUS = 8, F_ALT = 16 };

/* One integer conversion: sign/prefix, zero padding from flags or precision,
 * space padding to width. */
static void fmt_int(struct sink *s, uint64_t v, int neg, unsigned base, int upper,
                    int flags, int width, int prec, const char *prefix)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;

    if (!(prec == 0 && v == 0)) {
        do {
            tmp[n++] = digits[v % base];
            v /= base;
        } while (v);
    }
    char sign = neg ? '-' : (flags & F_PLUS) ? '+' : (flags & F_SPACE) ? ' ' : 0;
    int plen = prefix ? (int)strlen(prefix) : 0;
    int zeros = prec > n ? prec - n : 0;
    int total = n + zeros + plen + (sign != 0);

    if ((flags & F_ZERO) && !(flags & F_LEFT) && prec < 0 && width > total) {
        zeros += width - total;
        total = width;
    }
    if (!(flags & F_LEFT))
        pad(s, ' ', width - total);
    if (sign)
        s->put(s, sign);
    for (int i = 0; i < plen; i++)
        s->put(s, prefix[i]);
    pad(s, '0', zeros);
    while (n)
        s->put(s, tmp[--n]);
    if (flags & F_LEFT)
        pad(s, ' ', width - total);
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            s->put(s, *fmt);
            continue;
        }
        const char *start = fmt++;
        int flags = 0, width = 0, prec = -1, len = 0;   /* len: -2 hh, -1 h, 1 l, 2 ll */

        for (;; fmt++) {
            if (*fmt == '-') flags |= F_LEFT;
            else if (*fmt == '0') flags |= F_ZERO;
            else if (*fmt == ' ') flags |= F_SPACE;
            else if (*fmt == '+') flags |= F_PLUS;
            else if (*fmt == '#') flags |= F_ALT;
            else break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= F_LEFT;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        switch (*fmt) {
        case 'h': len = fmt[1] == 'h' ? (fmt++, -2) : -1; fmt++; break;
        case 'l': len = fmt[1] == 'l' ? (fmt++, 2) : 1; fmt++; break;
        case 'z': case 't': case 'j': len = 2; fmt++; break;
        }

        uint64_t u;
        int64_t i;
        switch (*fmt) {
        case 'd': case 'i':
            if (len >= 1) i = va_arg(ap, long);     /* long == long long here */
            else i = va_arg(ap, int);
            if (len == -1) i = (short)i;
            if (len == -2) i = (signed char)i;
            fmt_int(s, i < 0 ? -(uint64_t)i : (uint64_t)i, i < 0, 10, 0, flags, width, prec, NULL);
            break;
        case 'u': case 'x': case 'X': case 'o':
            if (len >= 1) u = va_arg(ap, unsigned long);
            else u = va_arg(ap, unsigned int);
            if (len == -1) u = (unsigned short)u;
            if (len == -2) u = (unsigned char)u;
            /* '#': 0x/0X before non-zero hex, a leading 0 for octal. */
            const char *alt = NULL;
            if ((flags & F_ALT) && u && *fmt != 'u')
                alt = *fmt == 'x' ? "0x" : *fmt == 'X' ? "0X" : "0";
            fmt_int(s, u, 0, *fmt == 'o' ? 8 : *fmt == 'u' ? 10 : 16, *fmt == 'X',
                    flags & ~(F_PLUS | F_SPACE), width, prec, alt);
            break;
        case 'p':
            u = (uintptr_t)va_arg(ap, void *);
            fmt_int(s, u, 0, 16, 0, flags & ~(F_PLUS | F_SPACE), width, prec, "0x");
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            if (!(flags & F_LEFT)) pad(s, ' ', width - 1);
            s->put(s, c);
            if (flags & F_LEFT) pad(s, ' ', width - 1);
            break;
        }
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            int n = 0;
            while (str[n] && (prec < 0 || n < prec))
                n++;
            if (!(flags & F_LEFT)) pad(s, ' ', width - n);
            for (int k = 0; k < n; k++)
                s->put(s, str[k]);
            if (flags & F_LEFT) pad(s, ' ', width - n);
            break;
        }
        case '%':
            s->put(s, '%');
            break;
        default:                /* unknown: print it verbatim */
            for (; start <= fmt && *start; start++)
                s->put(s, *start);
            if (!*fmt)
                return;
            break;
        }
    }
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink s = { .put = put_serial };
    format(&s, fmt, ap);
    return (int)s.len;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    struct sink s = { .put = put_buf, .buf = buf, .size = n };
    format(&s, fmt, ap);
    if (n)
        buf[s.len < n ? s.len : n - 1] = 0;
    return (int)s.len;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return r;
}
